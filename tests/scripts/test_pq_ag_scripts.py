"""The PQ-AG tables through the engine (issue 14): eval.py runs the white-box suite and the transfer
protocol (``--source``) on tiny DPQNs trained by train.py on synthetic data; ``scripts/pq_ag_table.py``
only reads the reports and prints the tables."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from robust_ranking.cli import eval as eval_script
from run_helpers import REPO, train_in


# configs/suites/pqag_table.yaml / pqag_transfer.yaml, shrunk: 8 of the 24 queries in batches of 4,
# eps 0.1 (the synthetic classes are far apart: the attacks must change codes).
WHITE_BOX = """
name: tiny-pqag
num_samples: 8
seed: 0
batch_size: 4
attacks:
  - {attack: "PQ-AG:Basic", epsilons: [0.1], alpha: 0.01, steps: 5, random_start: true}
  - {attack: "PQ-AG:APD", epsilons: [0.1], alpha: 0.01, steps: 5, random_start: true}
  - {attack: "PQ-AG:AOD", epsilons: [0.1], alpha: 0.01, steps: 5, random_start: true}
"""
TRANSFER = """
name: tiny-pqag-transfer
num_samples: 8
seed: 0
batch_size: 4
attacks:
  - {attack: "PQ-AG:AOD", epsilons: [0.1], alpha: 0.01, steps: 5, random_start: true}
"""


def load_script(name: str) -> Any:
    """``scripts/<name>.py`` imported by file path (no ``sys.path`` edit)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dpqns(tmp_path_factory) -> dict[str, Path]:
    """Two tiny 16-bit DPQNs (LeNet 16-d, two seeds) with a query / database split (24 queries)."""
    root = tmp_path_factory.mktemp("pqag_scripts")
    ckpts = {}
    for name, seed in (("dpqn_a", "0"), ("dpqn_b", "1")):
        train_in(root, [
            "fit", "--config", str(REPO / "configs/fashion_mnist_dpqn_24bit.yaml"), "--seed_everything", seed,
            "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
            "--trainer.logger.init_args.name", name,
            "--model.init_args.backbone", "robust_ranking.lightning_modules.LeNet",
            "--model.init_args.backbone.init_args.embedding_dim", "16", "--model.init_args.num_bits", "16",
            "--data", "robust_ranking.data.SyntheticDataModule", "--data.batch_size", "16",
            "--data.samples_per_class", "4", "--data.test_per_class", "16", "--data.eval_batch_size", "64",
            "--data.protocol", "query_database", "--data.num_queries", "24", "--data.database", "test_rest",
        ])
        ckpts[name] = root / "runs" / name / "version_0" / "checkpoints" / "last.ckpt"
    (root / "white_box.yaml").write_text(WHITE_BOX)
    (root / "transfer.yaml").write_text(TRANSFER)
    return {**ckpts, "root": root}


def _eval(argv: list[str]) -> None:
    eval_script.main([*argv, "--accelerator", "cpu", "--progress", "false"])


@pytest.fixture(scope="module")
def reports(dpqns) -> dict[str, Path]:
    root = dpqns["root"]
    _eval(["--ckpt", str(dpqns["dpqn_a"]), "--suite", str(root / "white_box.yaml"), "--output_dir", str(root / "wb")])
    pair = [str(dpqns["dpqn_a"]), str(dpqns["dpqn_b"])]
    _eval(["--source", *pair, "--ckpt", *pair, "--suite", str(root / "transfer.yaml"), "--output_dir",
           str(root / "tr")])
    return {"white_box": root / "wb" / "last.tiny-pqag.json", "transfer": root / "tr" / "transfer_tiny-pqag-transfer.json"}


def test_the_engine_reports_code_change_and_feature_shift(reports):
    results = {r["attack"]: r for r in json.loads(reports["white_box"].read_text())["results"]}
    assert list(results) == ["PQ-AG:Basic", "PQ-AG:APD", "PQ-AG:AOD"]
    for r in results.values():
        assert r["T"] == 8 and 0 < r["code_change"] <= 1 and r["feature_shift"] > 0
        assert 0 < r["peak_probability_clean"] <= 1 and r["entropy_clean"] >= 0


def test_pq_ag_transfer_through_eval_source(reports):
    """The diagonal of the transfer matrix is the engine's white-box AOD (same queries, seeds, batches)."""
    data = json.loads(reports["transfer"].read_text())
    (row,) = data["results"]
    assert row["attack"] == "PQ-AG:AOD" and row["num_queries"] == 8
    assert list(row["matrix"]) == ["dpqn_a", "dpqn_b"] and list(row["matrix"]["dpqn_a"]) == ["dpqn_a", "dpqn_b"]
    aod = next(r for r in json.loads(reports["white_box"].read_text())["results"] if r["attack"] == "PQ-AG:AOD")
    cell = row["matrix"]["dpqn_a"]["dpqn_a"]
    assert cell["ap_sdc"] == pytest.approx(aod["mean"], abs=1e-6)
    assert cell["ap_adc"] == pytest.approx(aod["ap_adc"], abs=1e-6)
    assert cell["ap_sdc_clean"] == pytest.approx(aod["clean"], abs=1e-6)
    for cells in row["matrix"].values():
        for value in cells.values():
            assert 0 <= value["ap_sdc"] <= 1 and 0 <= value["ap_adc"] <= 1
    # the clean queries are the same for every source
    assert row["matrix"]["dpqn_b"]["dpqn_a"]["ap_sdc_clean"] == cell["ap_sdc_clean"]
    assert "PQ-AG rows" in reports["transfer"].with_suffix(".md").read_text()


def test_table_script_reads_the_reports(reports, capsys):
    table = load_script("pq_ag_table")
    text = table.main([f"A={reports['white_box']}", "--transfer", str(reports["transfer"])])
    assert text == capsys.readouterr().out
    results = {r["attack"]: r for r in json.loads(reports["white_box"].read_text())["results"]}
    assert f"| SDC | Clean | {100 * results['PQ-AG:Basic']['clean']:.1f} |" in text
    assert f"|  | APD | {100 * results['PQ-AG:APD']['ap_adc']:.1f} |" in text
    aod = results["PQ-AG:AOD"]
    assert f"{aod['code_change']:.3f} / {aod['feature_shift']:.3f}" in text
    assert "| crafted on \\ attacked | dpqn_a | dpqn_b |" in text
    cell = json.loads(reports["transfer"].read_text())["results"][0]["matrix"]["dpqn_b"]["dpqn_a"]
    assert f"{100 * cell['ap_sdc']:.1f} / {100 * cell['ap_adc']:.1f}" in text


def test_table_script_refuses_reports_without_pq_ag(tmp_path):
    table = load_script("pq_ag_table")
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"results": [{"attack": "CA+", "eps": 0.1}]}))
    with pytest.raises(SystemExit, match="no PQ-AG results"):
        table.main([f"x={path}"])
    with pytest.raises(SystemExit, match="no PQ-AG transfer results"):
        table.main(["--transfer", str(path)])


def test_pq_transfer_refuses_models_without_codebooks(tiny_ranker):
    """A metric ranker has no SDC / ADC (eval.py --source says so in one line before any attack runs)."""
    import torch

    from robust_ranking.attacks.gallery import Gallery
    from robust_ranking.attacks.quantization import PQAGAttack
    from robust_ranking.attacks.quantization.pq_transfer import pq_transfer_attack

    model = tiny_ranker.model
    gallery = Gallery(torch.zeros(4, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="needs PQ rankers"):
        pq_transfer_attack(model, {"m": model}, PQAGAttack("aod"), torch.zeros(2, 1, 28, 28),
                           torch.zeros(2, dtype=torch.long), torch.arange(2), {"m": gallery}, gallery)


def test_gradient_study_in_bench(dpqns, capsys):
    """bench/pq_ag_gradients.py (a measurement study of the losses, not an evaluation): Basic and AOD are
    stationary at the clean query, APD is not."""
    spec = importlib.util.spec_from_file_location("pq_ag_gradients", REPO / "bench" / "pq_ag_gradients.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    out = study.main([f"a={dpqns['dpqn_a']}", "--num-queries", "4"])["a"]
    assert out["basic"]["l1_at_clean"] == 0 and out["apd"]["l1_at_clean"] > 0
    assert out["aod"]["l1_at_clean"] < 1e-3 * out["apd"]["l1_at_clean"]
    assert all(out[v]["l1_at_start"] > 0 for v in ("basic", "apd", "aod"))
    assert set(out["flips"]) == {"apd", "aod"} and "cos(APD, AOD)" in capsys.readouterr().out


@pytest.mark.slow
def test_pq_ag_transfer_ddp_world_size_2_equals_world_size_1(dpqns, reports, tmp_path):
    """The PQ-AG rows of the transfer protocol split the query batches over 2 gloo processes: every
    number equals world size 1's (the ``reports`` fixture's run), no tolerance."""
    pair = [str(dpqns["dpqn_a"]), str(dpqns["dpqn_b"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), "--source", *pair, "--ckpt", *pair, "--suite",
                           str(dpqns["root"] / "transfer.yaml"), "--accelerator", "cpu", "--progress", "false",
                           "--devices", "2", "--output_dir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / reports["transfer"].name).read_text())
    one = json.loads(reports["transfer"].read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert [r["matrix"] for r in two["results"]] == [r["matrix"] for r in one["results"]]
