"""Golden numbers: the robustness engine's results on a tiny seeded ranker, fixed before refactors.

A refactor of the evaluation engine must leave every number bit-identical. The expected values in
``tests/golden/*.json`` were produced by the engine before the trust work of issue 13 (and must keep
matching after the one-engine redesign). If a change is *meant* to alter numbers, regenerate the file
with ``python tests/test_golden_numbers.py`` and say why in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GOLDEN = Path(__file__).with_name("golden")

RANKING_SUITE = {
    "name": "golden-ranking", "num_samples": 20, "seed": 3, "batch_size": 8,
    "attacks": [
        {"attack": "CA+", "epsilons": [0.03, 0.1], "w": [1, 2], "steps": 4},
        {"attack": "CA-", "epsilons": [0.1], "w": [1], "steps": 4},
        {"attack": "QA+", "epsilons": [0.1], "m": [1, 2], "steps": 4},
        {"attack": "QA-", "epsilons": [0.1], "m": [1], "steps": 4},
        {"attack": "ES", "epsilons": [0.1], "steps": 4},
    ],
}


def ranking_numbers(tiny) -> dict:
    """Every reduced number of the golden ranking suite (as floats' exact reprs, via JSON)."""
    from attacks.robustness_evaluator import RobustnessEvaluator
    from attacks.suite import Suite

    suite = Suite.from_dict(RANKING_SUITE)
    results = RobustnessEvaluator(suite, progress=False).run(tiny.model, tiny.datamodule.eval_set)
    rows = [{"attack": r.attack, "eps": r.eps, "size": r.size, "mean": r.mean, "std": r.std, "count": r.count,
             "clean": r.clean, "extra": dict(r.extra)} for r in results.results]
    return {"results": rows, "clean": results.clean, "score": results.score.value,
            "per_attack": results.score.per_attack, "attacked": results.attacked_indices}


def test_ranking_suite_numbers_are_unchanged(tiny_ranker):
    expected = json.loads((GOLDEN / "ranking.json").read_text())
    assert json.loads(json.dumps(ranking_numbers(tiny_ranker))) == expected


if __name__ == "__main__":  # regenerate (only when a change is meant to alter the numbers)
    sys.path[:0] = [str(Path(__file__).parents[1]), str(Path(__file__).parent)]
    import torch

    from conftest import train_tiny_ranker

    torch.set_num_threads(1)
    (GOLDEN / "ranking.json").write_text(json.dumps(ranking_numbers(train_tiny_ranker()), indent=1) + "\n")
    print(f"wrote {GOLDEN / 'ranking.json'}")
