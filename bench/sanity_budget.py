"""How large the sanity checks' PGD budget must be: the unbounded (eps = 1) rank attacks on the tiny
test ranker (tests/conftest.py; its copy bench/tiny_ranker.py) for several steps / step sizes, T = 50.

    OMP_NUM_THREADS=1 .venv/bin/python bench/sanity_budget.py

Prints, per (steps, alpha), the mean rank each sanity configuration reaches and whether it passes
(CA+ / QA+ <= 5%, CA- / QA- >= 90%). The defaults of evaluation.suite.SanitySettings come from it.
"""

from __future__ import annotations

import time


def main() -> None:
    import torch
    from tiny_ranker import train_tiny_ranker  # bench/tiny_ranker.py (the script's folder is on the path)

    from robust_ranking.evaluation import RobustnessEvaluator, Suite

    torch.set_num_threads(1)
    tiny = train_tiny_ranker()
    attacks = [{"attack": a, "epsilons": [0.1], k: [1], "steps": 2}
               for a, k in (("CA+", "w"), ("CA-", "w"), ("QA+", "m"), ("QA-", "m"))]
    print("| steps | alpha | CA+ | CA- | QA+ | QA- | all pass | wall s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for steps, alpha in ((30, 0.01), (20, 0.05), (50, 0.05), (50, 0.02), (100, 0.02), (100, 0.01)):
        suite = Suite.from_dict({"name": "sanity-budget", "num_samples": 50, "batch_size": 50,
                                 "sanity": {"steps": steps, "alpha": alpha}, "attacks": attacks})
        start = time.perf_counter()
        res = RobustnessEvaluator(suite, progress=False).run(tiny.model, tiny.datamodule.eval_set)
        wall = time.perf_counter() - start
        means = " | ".join(f"{c.result.mean:.1f}" for c in res.sanity)
        ok = "yes" if all(c.passed for c in res.sanity) else "no"
        print(f"| {steps} | {alpha:g} | {means} | {ok} | {wall:.1f} |")


if __name__ == "__main__":
    main()
