"""The deep-hashing suite through eval.py: world size 2 (gloo, 2 CPU processes) gives exactly the
numbers of world size 1 (issue 6, done-when 2), on a tiny DCH trained by train.py on synthetic data.

tests/evaluation/test_sdha_engine.py checks the same property in one process with threads standing in for
ranks; this runs the real thing: eval.py's DDP launch, the query / database split rebuilt from the
run's config on every rank, sharded queries and the gathered per-query results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from run_helpers import REPO, report_numbers, train_in


# All six hashing attacks of configs/suites/sdha_fashion_mnist.yaml, shrunk: T = 13 queries (odd, so
# one rank attacks 7 and the other 6 + padding; batches of 4 leave a ragged last batch on both), few
# iterations, topk below the database size. eps 0.3: the synthetic classes are far apart, and the
# attacks must actually move AP for the comparison to mean something.
SUITE = """
name: sdha-ddp-test
num_samples: 13
seed: 0
batch_size: 4
attacks:
  - {attack: SDHA, epsilons: [0.3], steps: 12, check_every: 4, lagrange: 100, topk: 16}
  - {attack: SDHA-UW, epsilons: [0.3], steps: 12, check_every: 4, lagrange: 100, topk: 16}
  - {attack: HAG, epsilons: [0.3], steps: 12, check_every: 4, topk: 16}
  - {attack: SDHA-T, epsilons: [0.3], steps: 12, check_every: 4, lagrange: 100, topk: 16, target_label: random}
  - {attack: SDHA-UW-T, epsilons: [0.3], steps: 12, check_every: 4, lagrange: 100, topk: 16, target_label: random}
  - {attack: DHTA, epsilons: [0.3], steps: 12, check_every: 4, alpha: 0.01, topk: 16, target_label: random}
"""
ATTACKS = ["SDHA", "SDHA-UW", "HAG", "SDHA-T", "SDHA-UW-T", "DHTA"]


@pytest.fixture(scope="module")
def tiny_dch_run(tmp_path_factory) -> dict[str, Path]:
    """``train.py fit`` of the 16-bit DCH config shrunk to a LeNet(32-d) on synthetic data with a
    query / database split (24 queries, the other 40 test images the database)."""
    root = tmp_path_factory.mktemp("sdha_ddp")
    train_in(root, [
        "fit", "--config", str(REPO / "configs/fashion_mnist_dch_16.yaml"),
        "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
        "--trainer.logger.init_args.name", "tiny_dch",
        "--model.init_args.backbone", "robust_ranking.lightning_modules.LeNet",
        "--model.init_args.backbone.init_args.embedding_dim", "32",
        "--data", "robust_ranking.data.SyntheticDataModule", "--data.batch_size", "16", "--data.samples_per_class", "4",
        "--data.test_per_class", "16", "--data.eval_batch_size", "64", "--data.protocol", "query_database",
        "--data.num_queries", "24", "--data.database", "test_rest",
    ])
    run = root / "runs" / "tiny_dch" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["init_args"]["protocol"] == "query_database"  # eval.py builds the split from it
    assert config["model"]["init_args"]["hash_bits"] == 16
    (root / "suite.yaml").write_text(SUITE)
    return {"ckpt": ckpt, "suite": root / "suite.yaml"}


@pytest.mark.slow
def test_sdha_suite_ddp_world_size_2_equals_world_size_1(tiny_dch_run, tmp_path):
    """Query shards reduced in query-index order, random target labels keyed per query, fixed batch
    shapes (the engine pads, the hashing loop masks stopped queries instead of dropping them): the
    gloo run must match bit for bit, no tolerance."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    reports = {}
    for devices in (2, 1):
        out = tmp_path / f"devices{devices}"
        proc = subprocess.run(
            [sys.executable, str(REPO / "eval.py"), "--ckpt", str(tiny_dch_run["ckpt"]),
             "--suite", str(tiny_dch_run["suite"]), "--accelerator", "cpu", "--devices", str(devices),
             "--output-dir", str(out), "--no-progress"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[devices] = json.loads((out / f"{tiny_dch_run['ckpt'].stem}.sdha-ddp-test.json").read_text())
    assert reports[2]["world_size"] == 2 and reports[1]["world_size"] == 1
    by_name = {r["attack"]: r for r in reports[1]["results"] if r["metric"] == "ap"}
    assert list(by_name) == ATTACKS, reports[1].get("skipped")
    for name, r in by_name.items():  # not vacuous: all 13 queries attacked, AP moved the attack's way
        assert r["T"] == 13, name
        if name in ("SDHA", "SDHA-UW", "HAG"):
            assert r["mean"] < r["clean"], name
        else:
            assert r["mean"] > r["clean"], name
    assert reports[1]["clean_query_database"]["queries"] == 24  # the clean section: every query, on rank 0
    assert report_numbers(reports[2]) == report_numbers(reports[1])



def test_the_clean_map_is_one_number_in_ranking_universal_and_transfer_reports(tmp_path):
    """One clean-metric function (encode + code_distance, as the retrieval index ranks) in every
    report family: for a DCH model the clean mAP of X is the same number in all three. The model is
    trained for one step only, so that retrieval is imperfect and ranking by the relaxed codes
    (embed) would give another number."""
    from robust_ranking.cli import eval as eval_script
    from robust_ranking.evaluation.checkpoints import load_ranker

    train_in(tmp_path, [
        "fit", "--config", str(REPO / "configs/fashion_mnist_dch_16.yaml"), "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.name", "dch", "--model.init_args.backbone", "robust_ranking.lightning_modules.LeNet",
        "--model.init_args.backbone.init_args.embedding_dim", "32", "--data", "robust_ranking.data.SyntheticDataModule",
        "--data.batch_size", "16", "--data.samples_per_class", "4", "--data.test_per_class", "16",
        "--data.eval_batch_size", "64", "--data.protocol", "query_database", "--data.num_queries", "24",
        "--data.database", "test_rest", "--data.noise_std", "2.0"])
    ckpt = str(tmp_path / "runs" / "dch" / "version_0" / "checkpoints" / "last.ckpt")
    ranking, universal, transfer = (tmp_path / f"{n}.yaml" for n in ("ranking", "universal", "transfer"))
    ranking.write_text("name: r\nnum_samples: 4\nsanity: false\nattacks: [{attack: CA+, epsilons: [0.1], steps: 1}]\n")
    universal.write_text("kind: universal\nname: u\nnum_samples: 4\nattacks: [{attack: I-CA+, epsilons: [0.1], "
                         "epochs: 1}]\n")
    transfer.write_text("name: t\nnum_samples: 4\nattacks: [{attack: CA+, epsilons: [0.1], steps: 1}]\n")
    common = ["--accelerator", "cpu", "--no-progress", "--output-dir", str(tmp_path / "out")]
    (r,) = eval_script.main(["--ckpt", ckpt, "--suite", str(ranking), *common])
    (u,) = eval_script.main(["--ckpt", ckpt, "--suite", str(universal), *common])
    (t,) = eval_script.main(["--source", ckpt, "--ckpt", ckpt, "--suite", str(transfer), *common])
    (t_clean,) = t["clean"].values()
    assert r.data["clean"]["map"] == u["clean"]["map"] == t_clean["map"]
    assert r.data["clean"]["recall@1"] == u["clean"]["recall@1"] == t_clean["recall@1"]

    # Not vacuous: ranked by the continuous embeddings, the same X gives another mAP.
    from robust_ranking.evaluation.data import gallery_tensors
    from robust_ranking.evaluation.engine import clean_metrics

    model = load_ranker(Path(ckpt), None, "test")
    from robust_ranking.data import SyntheticDataModule

    dm = SyntheticDataModule(batch_size=16, samples_per_class=4, test_per_class=16, eval_batch_size=64,
                             protocol="query_database", num_queries=24, database="test_rest", noise_std=2.0)
    dm.setup("test")
    images, labels = gallery_tensors(dm)
    with torch.no_grad():
        by_embedding = clean_metrics(model, model.embed(images), labels)  # no codes: embeddings + code_distance
        relaxed = evaluate_relaxed(model, images, labels)
    assert 0 < r.data["clean"]["map"] < 1
    assert relaxed != r.data["clean"]["map"] or by_embedding["map"] != r.data["clean"]["map"]


def evaluate_relaxed(model, images, labels) -> float:
    """mAP of X ranked by the relaxed codes with the differentiable distance (the old universal /
    transfer clean metric)."""
    from robust_ranking.retrieval.metrics import evaluate_retrieval

    emb = model.embed(images)
    return float(evaluate_retrieval(emb, labels, emb, labels, model.distance, exclude_self=True, recall_ks=(1,),
                                    nmi=False)["map"])
