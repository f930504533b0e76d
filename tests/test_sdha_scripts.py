"""The SDHA scripts end to end on a tiny DCH run trained by train.py on synthetic data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dch_run")
    cwd = Path.cwd()
    try:
        os.chdir(tmp)  # runs/ and config.yaml land in the temporary folder
        train.main([
            "fit", "--config", str(REPO / "configs/fashion_mnist_dch_16.yaml"),
            "--data", "data.SyntheticDataModule", "--data.batch_size", "16", "--data.samples_per_class", "4",
            "--data.eval_batch_size", "64", "--data.num_queries", "8", "--data.protocol", "query_database",
            "--model.init_args.backbone.init_args.embedding_dim", "16",
            "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
        ])
    finally:
        os.chdir(cwd)
    return tmp / "runs/fashion_mnist_dch_16/version_0/checkpoints/last.ckpt"


@pytest.fixture
def scripts_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))


def test_clean_map_script(tiny_run, scripts_on_path, capsys):
    import sdha_clean_map

    rows = sdha_clean_map.main([str(tiny_run)])
    assert rows[0]["bits"] == 16 and rows[0]["queries"] == 8 and rows[0]["database"] == 128
    assert rows[0]["map@1000"] == pytest.approx(rows[0]["map@1000_faiss"])
    assert "| 16 |" in capsys.readouterr().out


def test_tables_script_and_reprint(tiny_run, scripts_on_path, tmp_path, capsys):
    import sdha_tables

    out = tmp_path / "tables.json"
    common = ["--queries", "4", "--batch", "2", "--steps", "10", "--baseline-steps", "10", "--check-every", "5",
              "--eps", "0.3", "--topk", "10", "--lagrange", "100", "--out", str(out)]
    sdha_tables.main(["--ckpt", str(tiny_run), "--attacks", "SDHA", "HAG", *common])
    sdha_tables.main(["--ckpt", str(tiny_run), "--attacks", "SDHA-T", "DHTA", "--search-steps", "2",
                      "--goal-ap-targeted", "0.5", *common])  # merged into the file
    results = json.loads(out.read_text())
    assert set(results["16"]) == {"ckpt", "SDHA", "HAG", "SDHA-T", "DHTA"}
    assert len(results["16"]["SDHA"]["ap"]) == 4 and results["16"]["SDHA"]["iterations"] == [0, 5, 10]
    sdha_t = results["16"]["SDHA-T"]
    assert sdha_t["hparams"]["search_steps"] == 2 and sdha_t["hparams"]["goal_ap"] == 0.5
    assert results["16"]["DHTA"]["hparams"]["goal_ap"] == 0.5 and results["16"]["SDHA"]["hparams"]["goal_ap"] == 0.0
    assert len(sdha_t["lagrange"]) == 4 and sdha_t["mean_search_iterations"] >= sdha_t["mean_iterations"]
    capsys.readouterr()
    sdha_tables.main(["--from-json", str(out)])
    printed = capsys.readouterr().out
    assert "Untargeted (Table 2)" in printed and "| SDHA-T |" in printed and "Table 4 layout" in printed


def test_eval_py_runs_the_sdha_quick_suite_on_a_dch_checkpoint(tiny_run, tmp_path, capsys):
    import eval as eval_cli

    reports = eval_cli.main(["--ckpt", str(tiny_run), "--suite", str(REPO / "configs/suites/sdha_quick.yaml"),
                             "--accelerator", "cpu", "--output-dir", str(tmp_path), "--no-progress"])
    data = json.loads((tmp_path / "last.sdha_quick.json").read_text())  # <ckpt>.<suite>.json
    rows = {r["attack"]: r for r in data["results"]}
    assert set(rows) == {"SDHA", "SDHA-UW", "HAG", "SDHA-T", "SDHA-UW-T", "DHTA"}
    for name in ("SDHA", "HAG"):
        assert rows[name]["mean"] <= rows[name]["clean"]
    assert len(reports) == 1 and "SDHA" in capsys.readouterr().out
