"""The SDHA scripts end to end on a tiny DCH run trained by train.py on synthetic data: eval.py gathers the
attack traces (suites with ``traces: true``) and the clean query / database metrics, ``scripts/sdha_tables.py``
and ``scripts/sdha_clean_map.py`` print the tables from its reports."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from robust_ranking.cli import train
from robust_ranking.data import RetrievalDataModule
from robust_ranking.evaluation import checkpoints
from run_helpers import REPO



@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dch_run")
    cwd = Path.cwd()
    try:
        os.chdir(tmp)  # runs/ and config.yaml land in the temporary folder
        train.main([
            "fit", "--config", str(REPO / "configs/fashion_mnist_dch_16.yaml"),
            "--data", "robust_ranking.data.SyntheticDataModule", "--data.batch_size", "16", "--data.samples_per_class", "4",
            "--data.eval_batch_size", "64", "--data.num_queries", "8", "--data.protocol", "query_database",
            "--model.init_args.backbone.init_args.embedding_dim", "16",
            "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
        ])
    finally:
        os.chdir(cwd)
    return tmp / "runs/fashion_mnist_dch_16/version_0/checkpoints/last.ckpt"


def load_script(name: str, monkeypatch) -> Any:
    """``scripts/<name>.py`` imported by file path (no ``sys.path`` edit)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    loaded = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, loaded)
    spec.loader.exec_module(loaded)
    return loaded


def load_run(ckpt: Path) -> tuple[Any, Any]:
    """``(model in eval mode, set-up data module)`` of a training run, through the engine's safe loader."""
    model_section, data_section, where = checkpoints.run_config(ckpt, None)
    model = checkpoints.load_ranker(ckpt, model_section, where).eval()
    datamodule = checkpoints.instantiate(data_section, RetrievalDataModule, "data", where)
    datamodule.setup()
    return model, datamodule


TRACES_SUITE = """
name: tiny-sdha-tables
num_samples: 4
seed: 0
batch_size: 2
traces: true
attacks:
  - {attack: SDHA, epsilons: [0.3], steps: 10, check_every: 5, topk: 10, lagrange: 100, tanh_scale_factor: auto}
  - {attack: HAG, epsilons: [0.3], steps: 10, check_every: 5, topk: 10, lr: 500}
  - {attack: SDHA-T, epsilons: [0.3], steps: 10, check_every: 5, topk: 10, lagrange: 100, target_label: random, search_steps: 2, goal_ap: 0.5}
  - {attack: DHTA, epsilons: [0.3], steps: 10, check_every: 5, topk: 10, target_label: random, goal_ap: 0.5}
"""


def test_tables_from_eval_py_reports_with_traces(tiny_run, monkeypatch, tmp_path, capsys):
    import eval as eval_cli

    from robust_ranking.attacks.hashing.hashing_attack import logit_scale_factor

    suite = tmp_path / "suite.yaml"
    suite.write_text(TRACES_SUITE)
    eval_cli.main(["--ckpt", str(tiny_run), "--suite", str(suite), "--accelerator", "cpu", "--output-dir",
                   str(tmp_path / "out"), "--no-progress"])
    report = tmp_path / "out" / "last.tiny-sdha-tables.json"
    rows = {r["attack"]: r for r in json.loads(report.read_text())["results"]}
    sdha = rows["SDHA"]["trace"]
    assert sdha["iterations"] == [0, 5, 10] and len(sdha["ap"]) == 4 and len(sdha["l2"][0]) == 3
    assert sdha["hash_bits"] == 16 and sdha["indices"] == sorted(sdha["indices"])
    # tanh_scale_factor: auto is the logit scale of the whole workload, used by that attack only
    model, datamodule = load_run(tiny_run)
    images = torch.stack([datamodule.query_set[i][0] for i in sdha["indices"]])
    assert sdha["tanh_scale_factor"] == logit_scale_factor(model, images)
    assert sdha["tanh_scale_factor"] != 1.0 and rows["HAG"]["trace"]["tanh_scale_factor"] == 1.0
    factor = sdha["tanh_scale_factor"]
    assert rows["SDHA"]["hparams"]["tanh_scales"][0] == [0.0, 0.1 * factor]
    # the per-query values behind the row's means
    assert sum(sdha["per_sample"]["ap"]) / 4 == pytest.approx(rows["SDHA"]["mean"])
    assert len(rows["SDHA-T"]["trace"]["per_sample"]["lagrange"]) == 4

    sdha_tables = load_script("sdha_tables", monkeypatch)
    capsys.readouterr()
    merged = tmp_path / "tables.json"
    results = sdha_tables.main([str(report), "--json", str(merged)])
    printed = capsys.readouterr().out
    assert "Untargeted (Table 2)" in printed and "| SDHA-T |" in printed and "Table 4 layout" in printed
    assert set(results["16"]) == {"ckpt", "SDHA", "HAG", "SDHA-T", "DHTA"}
    sdha_t = results["16"]["SDHA-T"]
    assert sdha_t["hparams"]["search_steps"] == 2 and sdha_t["hparams"]["goal_ap"] == 0.5
    assert results["16"]["DHTA"]["hparams"]["goal_ap"] == 0.5 and results["16"]["SDHA"]["hparams"]["goal_ap"] == 0.0
    assert len(sdha_t["lagrange"]) == 4 and sdha_t["mean_search_iterations"] >= sdha_t["mean_iterations"]
    assert results["16"]["HAG"]["lagrange"] is None
    # the merged results (the earlier script-run format) print the same tables
    sdha_tables.main(["--from-json", str(merged)])
    assert capsys.readouterr().out == printed


def test_tables_script_refuses_reports_without_traces(tmp_path, monkeypatch):
    sdha_tables = load_script("sdha_tables", monkeypatch)
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"results": [{"attack": "SDHA", "eps": 0.1}]}))
    with pytest.raises(SystemExit, match="no attack traces"):
        sdha_tables.main([str(report)])


def test_eval_py_runs_the_sdha_quick_suite_on_a_dch_checkpoint(tiny_run, tmp_path, capsys, monkeypatch):
    import eval as eval_cli

    reports = eval_cli.main(["--ckpt", str(tiny_run), "--suite", str(REPO / "configs/suites/sdha_quick.yaml"),
                             "--accelerator", "cpu", "--output-dir", str(tmp_path), "--no-progress"])
    data = json.loads((tmp_path / "last.sdha_quick.json").read_text())  # <ckpt>.<suite>.json
    rows = {r["attack"]: r for r in data["results"]}
    assert set(rows) == {"SDHA", "SDHA-UW", "HAG", "SDHA-T", "SDHA-UW-T", "DHTA"}
    for name in ("SDHA", "HAG"):
        assert rows[name]["mean"] <= rows[name]["clean"]
    assert len(reports) == 1 and "SDHA" in capsys.readouterr().out
    # SDHA Table 1: the report's clean query / database section, printed by scripts/sdha_clean_map.py
    section = data["clean_query_database"]
    assert (section["family"], section["bits"], section["queries"], section["database"]) == ("hashing", 16, 8, 128)
    table1 = load_script("sdha_clean_map", monkeypatch).main([str(tmp_path / "last.sdha_quick.json")])
    assert table1[0]["map@1000"] == section["map@1000"] and f"| 16 | {section['map@1000']:.4f} |" in capsys.readouterr().out
    assert "Clean query / database retrieval (8 queries against 128 database items" in (
        tmp_path / "last.sdha_quick.md").read_text()
