"""The PQ-AG suite through eval.py: world size 2 (gloo, 2 CPU processes) gives exactly the numbers
of world size 1 (issue 5, done-when 2), on a tiny DPQN trained by train.py on synthetic data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from robust_ranking.cli import eval as eval_script
from run_helpers import REPO, report_numbers, train_in


# The paper's suite (configs/suites/pqag_table.yaml) with T = 15 queries: odd, so under 2
# processes one rank attacks 8 queries and the other 7, and batches of 4 leave a ragged last
# batch (7 = 4 + 3 on one rank, 15 = 3 x 4 + 3 in one process) that the engine pads. eps is larger than 8/255 because the synthetic classes are far
# apart (see tests/attacks/test_pq_ag_attack.py): the attacks must actually change codes for the
# comparison to mean something.
SUITE = """
name: pqag-ddp-test
num_samples: 15
seed: 0
batch_size: 4
attacks:
  - {attack: "PQ-AG:Basic", epsilons: [0.1], alpha: 0.01, steps: 5, random_start: true}
  - {attack: "PQ-AG:APD", epsilons: [0.1], alpha: 0.01, steps: 5, random_start: true}
  - {attack: "PQ-AG:AOD", epsilons: [0.1], alpha: 0.01, steps: 5, random_start: true}
"""


@pytest.fixture(scope="module")
def tiny_dpqn_run(tmp_path_factory) -> dict[str, Path]:
    """``train.py fit`` of the 24-bit DPQN config shrunk to a LeNet(16-d) on synthetic data with a
    query / database split (24 queries, the other 40 test images the database), at 16 bits
    (M = 4 codebooks of K = 16 codewords: 64 per 4-d sub-space would mostly stay unused)."""
    root = tmp_path_factory.mktemp("pqag_ddp")
    train_in(root, [
        "fit", "--config", str(REPO / "configs/fashion_mnist_dpqn_24bit.yaml"),
        "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
        "--trainer.logger.init_args.name", "tiny_dpqn",
        "--model.init_args.backbone", "robust_ranking.lightning_modules.LeNet",
        "--model.init_args.backbone.init_args.embedding_dim", "16", "--model.init_args.num_bits", "16",
        "--data", "robust_ranking.data.SyntheticDataModule", "--data.batch_size", "16", "--data.samples_per_class", "4",
        "--data.test_per_class", "16", "--data.eval_batch_size", "64", "--data.protocol", "query_database",
        "--data.num_queries", "24", "--data.database", "test_rest",
    ])
    run = root / "runs" / "tiny_dpqn" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["init_args"]["protocol"] == "query_database"  # eval.py builds the split from it
    (root / "suite.yaml").write_text(SUITE)
    return {"ckpt": ckpt, "suite": root / "suite.yaml"}


@pytest.mark.slow
def test_pqag_suite_ddp_world_size_2_equals_world_size_1(tiny_dpqn_run, tmp_path):
    """Same query shards reduced in query-index order, per-query random starts, fixed batch
    shapes (the engine pads the last batch): the gloo run must match bit for bit, no tolerance.
    World size 1 runs in this process (eval.main, as tests/cli/test_eval.py does) to save an
    interpreter start; world size 2 needs its own launcher process."""
    common = ["--ckpt", str(tiny_dpqn_run["ckpt"]), "--suite", str(tiny_dpqn_run["suite"]), "--accelerator", "cpu",
              "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), *common, "--devices", "2",
                           "--output-dir", str(tmp_path / "devices2")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    eval_script.main([*common, "--devices", "1", "--output-dir", str(tmp_path / "devices1")])
    stem = tiny_dpqn_run["ckpt"].stem
    reports = {n: json.loads((tmp_path / f"devices{n}" / f"{stem}.pqag-ddp-test.json").read_text()) for n in (2, 1)}
    assert reports[2]["world_size"] == 2 and reports[1]["world_size"] == 1
    attacks = [r["attack"] for r in reports[1]["results"]]
    assert attacks == ["PQ-AG:Basic", "PQ-AG:APD", "PQ-AG:AOD"], reports[1].get("skipped")
    for r in reports[1]["results"]:  # not vacuous: all 15 queries attacked, some codes changed
        assert r["T"] == 15 and r["code_change"] > 0
        assert 0.0 <= r["mean"] <= 1.0 and 0.0 <= r["ap_adc"] <= 1.0
    assert reports[1]["clean_query_database"]["queries"] == 24  # the clean section: every query, on rank 0
    assert report_numbers(reports[2]) == report_numbers(reports[1])
