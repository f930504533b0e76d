"""Universal suites and transfer runs through eval.py under DDP: world size 2 (gloo, 2 CPU processes
started by Lightning) gives the numbers of world size 1 (issue 14, point 2).

How the work is split (robust_ranking/attacks/universal/sharding.py): a universal fit step gathers the
per-sample input gradients of every rank's slice of the fit batch and sums them in sample order, as
one process sums its whole batch; measurements, transfer attack batches and embedding passes are
split by whole batches. So the reduction order never depends on W. A fit step's per-sample gradient
is computed in a forward of ceil(B / W) rows instead of B; on a CPU, oneDNN runs LeNet the same, bit for
bit, at 2..15 rows (and at 16+ rows, and at 1 row), so the batch sizes below keep every forward of
both world sizes in one of those classes and the comparison is exact, no tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from run_helpers import REPO, train_tiny_ranker


RUN_CONFIG = """
model:
  class_path: robust_ranking.lightning_modules.MetricRanker
  init_args:
    backbone: {class_path: robust_ranking.lightning_modules.LeNet, init_args: {embedding_dim: 16}}
    loss:
      class_path: pytorch_metric_learning.losses.TripletMarginLoss
      init_args:
        margin: 0.2
        distance: {class_path: pytorch_metric_learning.distances.CosineSimilarity}
data:
  class_path: robust_ranking.data.SyntheticDataModule
  init_args: {test_per_class: 25, eval_batch_size: 64, seed: 0}
"""

# Fit and unseen sets of 7 in batches of 6: the second fit batch has one sample, so under 2 processes
# rank 1's slice of it is empty (it sends zero rows) and every measurement has a spare slot on rank 1.
# I-CA+ / I-QA- (keyed targets, top-1% pool), UAP-IR list-wise with random resizing (the same scale
# draws on every rank) and label-wise at two eval scales.
UNIVERSAL_SUITE = """
name: universal-ddp-test
kind: universal
num_samples: 7
seed: 0
batch_size: 6
attacks:
  - {attack: I-CA+, epsilons: [0.3], w: [1], epochs: 2}
  - {attack: I-QA-, epsilons: [0.3], m: [1], epochs: 2, xi: 0}
  - {attack: "UAP-IR:list", epsilons: [0.3], epochs: 2, resize_range: [0.75, 1.25], input_size: [28, 28], eval_scales: [1.0]}
  - {attack: "UAP-IR:label", epsilons: [0.3], epochs: 2, input_size: [28, 28], eval_scales: [0.5, 1.0]}
"""

# T = 7 in batches of 3 (3 + 3 + 1): rank 0 crafts batches 0 and 2, rank 1 batch 1 (and re-runs the
# last one in its spare slot); QA- with random starts keyed per sample.
TRANSFER_SUITE = """
name: transfer-ddp-test
num_samples: 7
seed: 0
batch_size: 3
attacks:
  - {attack: CA+, epsilons: [0.1], w: [1], steps: 3}
  - {attack: QA-, epsilons: [0.1], m: [2], steps: 3, xi: 100, random_start: true}
"""

#: Fields that differ between two runs of the same numbers.
VOLATILE = {"wall_s", "embed_wall_s", "created", "versions", "world_size", "tensorboard", "meta"}


def strip(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: strip(v) for k, v in data.items() if k not in VOLATILE}
    if isinstance(data, list):
        return [strip(v) for v in data]
    return data


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny LeNet rankers (seeds 0 and 1) saved as eval.py runs on the same synthetic X, and the suites."""
    root = tmp_path_factory.mktemp("universal_transfer_ddp")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        tiny = train_tiny_ranker(seed=seed)
        run = root / name / "version_0"
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text(RUN_CONFIG)
        torch.save({"state_dict": tiny.model.state_dict()}, run / "checkpoints" / "last.ckpt")
        out[name] = run / "checkpoints" / "last.ckpt"
    for name, text in (("universal", UNIVERSAL_SUITE), ("transfer", TRANSFER_SUITE)):
        (root / f"{name}.yaml").write_text(text)
        out[name] = root / f"{name}.yaml"
    return out


def run_both(argv: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """eval.py with ``argv`` at --devices 2 (its own launcher process; Lightning starts rank 1) and
    at --devices 1 (in this process, as tests/evaluation/test_pqag_ddp.py does): the two output folders."""
    from robust_ranking.cli import eval as eval_script

    common = [*argv, "--accelerator", "cpu", "--progress", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    two, one = tmp_path / "devices2", tmp_path / "devices1"
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), *common, "--devices", "2", "--output_dir", str(two)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    eval_script.main([*common, "--devices", "1", "--output_dir", str(one)])
    return two, one


@pytest.mark.slow
def test_universal_suite_ddp_world_size_2_equals_world_size_1(runs, tmp_path):
    two, one = run_both(["--ckpt", str(runs["a"]), "--suite", str(runs["universal"])], tmp_path)
    stem = "last.universal-ddp-test"
    reports = {n: json.loads((d / f"{stem}.json").read_text()) for n, d in ((2, two), (1, one))}
    assert reports[2]["world_size"] == 2 and reports[1]["world_size"] == 1
    assert not list(two.glob("*.partial.*")) and (two / "tensorboard" / stem).is_dir()
    rows = reports[1]["results"]
    assert [r["attack"] for r in rows] == ["I-CA+", "I-QA-", "UAP-IR:list", "UAP-IR:label"]
    assert reports[1]["fit_size"] == 7
    # Not vacuous: the I-CA / I-QA perturbations moved the ranks, the UAP-IR fits moved their objective
    # (the synthetic classes are too far apart for mAP to fall in 2 epochs) and mAP at another scale.
    assert rows[0]["fit"]["rank"] != rows[0]["fit"]["rank_clean"]
    assert rows[1]["fit"]["rank"] != rows[1]["fit"]["rank_clean"]
    assert rows[2]["history"][0] != rows[2]["history"][1] and rows[3]["history"][0] != rows[3]["history"][1]
    assert rows[3]["unseen_at_scale"]["0.5"]["mDR"] != 0
    assert strip(reports[2]) == strip(reports[1])  # every number, exactly
    perturbations = {n: torch.load(d / f"{stem}.pt") for n, d in ((2, two), (1, one))}
    assert list(perturbations[2]) == list(perturbations[1]) and len(perturbations[1]) == 4
    for label, r in perturbations[1].items():
        assert r.abs().max() > 0 and torch.equal(perturbations[2][label], r), label


@pytest.mark.slow
def test_transfer_ddp_world_size_2_equals_world_size_1(runs, tmp_path):
    a, b = str(runs["a"]), str(runs["b"])
    two, one = run_both(["--source", a, b, "--ckpt", a, b, "--suite", str(runs["transfer"])], tmp_path)
    reports = {n: json.loads((d / "transfer_transfer-ddp-test.json").read_text()) for n, d in ((2, two), (1, one))}
    assert reports[2]["world_size"] == 2 and reports[1]["world_size"] == 1
    rows = reports[1]["results"]
    assert [r["attack"] for r in rows] == ["CA+", "QA-"] and reports[1]["num_samples"] == 7
    for row in rows:  # not vacuous: a full 2 x 2 matrix, and the white-box cells moved
        assert len(row["matrix"]) == 2 and all(len(cells) == 2 for cells in row["matrix"].values())
        for src, cells in row["matrix"].items():
            assert cells[src]["rank"] != cells[src]["rank_clean"]
    assert strip(reports[2]) == strip(reports[1])  # every number, exactly
