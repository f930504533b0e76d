"""eval.py's jsonargparse command line: --config YAML, --print_config round trip, the older
dashed spellings, the Trainer flags reaching Lightning, the gallery status line and progress bar,
and a CPU run with nothing but progress on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import pytorch_lightning as pl

import robust_ranking.evaluation as evaluation
from robust_ranking.cli import eval as eval_script
from robust_ranking.evaluation import BenchmarkOptions
from robust_ranking.evaluation.benchmark import BenchmarkRun
from run_helpers import REPO, tiny_config, train_in



SUITE = """
name: cli-test
num_samples: 3
seed: 0
batch_size: 3
attacks:
  - {attack: CA+, epsilons: [0.1], w: [1], steps: 2}
sanity: {num_samples: 2, steps: 2}
"""


@pytest.fixture
def captured(monkeypatch) -> list:
    """``evaluation.benchmark`` replaced: main() parses and builds the options, nothing runs."""
    calls: list = []

    def fake(checkpoints, options, source=None):
        calls.append((list(checkpoints), options, source))
        return BenchmarkRun("ranking")

    monkeypatch.setattr(evaluation, "benchmark", fake)
    return calls


def _options(options: BenchmarkOptions) -> dict:
    return {k: v for k, v in asdict(options).items() if k != "should_stop"}


def test_every_option_from_a_yaml_and_flags_override_it(captured, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("ckpt: [a.ckpt, b.ckpt]\nsource: s.ckpt\nsuite: quick\nnum_samples: 7\nbatch_size: 4\n"
                      "devices: 2\nnum_nodes: 3\naccelerator: cpu\nstrategy: ddp\nprecision: bf16-mixed\n"
                      "data_config: d.yaml\noutput_dir: out\nprogress: false\noverwrite: true\nsanity: false\n"
                      "gallery_size: 50\n")
    eval_script.main(["--config", str(config), "--num_samples", "9"])
    ((ckpts, options, source),) = captured
    assert ckpts == ["a.ckpt", "b.ckpt"] and source == ["s.ckpt"]
    assert _options(options) == dict(
        suite="quick", num_samples=9, batch_size=4, devices=2, num_nodes=3, accelerator="cpu", strategy="ddp",
        precision="bf16-mixed", data_config="d.yaml", output_dir="out", progress=False, overwrite=True,
        sanity=False, gallery_size=50)
    assert callable(options.should_stop) and not options.should_stop()


def test_print_config_round_trips(captured, tmp_path, capsys):
    argv = ["--ckpt", "a.ckpt", "b.ckpt", "--suite", "quick", "--num_samples", "5", "--precision", "16",
            "--no-progress", "--overwrite", "--num_nodes", "2"]
    with pytest.raises(SystemExit) as info:
        eval_script.main([*argv, "--print_config"])
    assert info.value.code == 0 and not captured
    printed = capsys.readouterr().out
    assert "num_nodes: 2" in printed and "progress: false" in printed
    (tmp_path / "printed.yaml").write_text(printed)
    eval_script.main(argv)
    eval_script.main(["--config", str(tmp_path / "printed.yaml")])
    (ckpts1, direct, _), (ckpts2, from_yaml, _) = captured
    assert ckpts1 == ckpts2 == ["a.ckpt", "b.ckpt"] and _options(direct) == _options(from_yaml)


@pytest.mark.parametrize("old, new", [
    (["--data-config", "d.yaml", "--output-dir", "o", "--num-samples", "-1", "--batch-size", "2"],
     ["--data_config", "d.yaml", "--output_dir", "o", "--num_samples", "-1", "--batch_size", "2"]),
    (["--no-progress", "--no-sanity", "--overwrite"], ["--progress", "false", "--sanity=false", "--overwrite", "true"]),
    (["--gallery-size", "10", "--overwrite", "--devices", "2"],
     ["--gallery_size=10", "--overwrite=true", "--devices=2"]),
])
def test_the_older_spellings_still_work(captured, old, new):
    eval_script.main(["--ckpt", "a.ckpt", "b.ckpt", "--suite", "quick", *old])
    eval_script.main(["--ckpt", "[a.ckpt, b.ckpt]", "--suite", "quick", *new])
    (ckpts1, first, _), (ckpts2, second, _) = captured
    assert ckpts1 == ckpts2 == ["a.ckpt", "b.ckpt"] and _options(first) == _options(second)


@pytest.mark.parametrize("argv, expected", [
    (["--suite", "quick"], "the following arguments are required: --ckpt"),
    (["--ckpt", "a", "--suite", "quick", "--num-samples", "x"], "--num_samples: invalid value 'x' (expected int"),
    (["--ckpt", "a", "--suite", "quick", "--epsilon", "0.1"], "unrecognized arguments: --epsilon"),
    (["--config", "no/such.yaml"], "--config: File does not exist"),
])
def test_argument_errors_are_one_line(captured, capsys, argv, expected):
    with pytest.raises(SystemExit) as info:
        eval_script.main(argv)
    assert info.value.code == 2 and not captured
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("eval.py: error: ") and expected in line, line


def test_bad_trainer_options_are_one_line(tmp_path, capsys):
    ckpt = tmp_path / "a.ckpt"
    ckpt.write_bytes(b"")  # never loaded: the options are checked first
    cases = [(["--precision", "16-mixed", "--accelerator", "cpu"], "float16 autocast needs a GPU"),
             (["--precision", "64-true"], "--precision '64-true': choose one of"),
             (["--strategy", "ddp_spawn"], "--strategy ddp_spawn"),
             (["--strategy", "nosuch"], "invalid strategy name"),
             (["--num_nodes", "0"], "--num_nodes must be an integer >= 1"),
             (["--suite", "quik"], "unknown suite 'quik': give a suite file, or one of the shipped suites: ")]
    for extra, expected in cases:
        with pytest.raises(SystemExit) as info:
            eval_script.main(["--ckpt", str(ckpt), "--suite", "quick", *extra])
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and line.startswith("eval.py: error: ") and expected in line, line
    assert "quick" in line  # the unknown suite's line lists the shipped suites


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_cli")
    (root / "tiny.yaml").write_text(tiny_config(test_per_class=10, eval_batch_size=16))
    (root / "suite.yaml").write_text(SUITE)
    train_in(root, ["fit", "--config", str(root / "tiny.yaml")])
    (ckpt,) = (root / "runs" / "tiny" / "version_0" / "checkpoints").glob("*.ckpt")
    return {"root": root, "ckpt": ckpt, "suite": root / "suite.yaml"}


class _Reached(Exception):
    pass


def test_trainer_flags_reach_the_trainer(tiny_run, tmp_path, monkeypatch):
    built: list[dict] = []

    class Recorder:
        def __init__(self, **kwargs):
            built.append(kwargs)

        def test(self, *args, **kwargs):
            raise _Reached

    monkeypatch.setattr(pl, "Trainer", Recorder)
    with pytest.raises(_Reached):
        eval_script.main(["--ckpt", str(tiny_run["ckpt"]), "--suite", str(tiny_run["suite"]), "--accelerator", "cpu",
                          "--devices", "2", "--num_nodes", "3", "--strategy", "ddp_find_unused_parameters_false",
                          "--precision", "32", "--output_dir", str(tmp_path), "--progress", "false"])
    run_kwargs = built[-1]  # the runner's Trainer (the first one only checks the options)
    assert {k: run_kwargs[k] for k in ("accelerator", "devices", "num_nodes", "strategy", "precision")} == {
        "accelerator": "cpu", "devices": 2, "num_nodes": 3, "strategy": "ddp_find_unused_parameters_false",
        "precision": "32-true"}
    assert "callbacks" in run_kwargs and built[0]["num_nodes"] == 3


def test_bf16_mixed_run_records_its_precision(tiny_run, tmp_path):
    (report,) = eval_script.main(["--ckpt", str(tiny_run["ckpt"]), "--suite", str(tiny_run["suite"]),
                                  "--accelerator", "cpu", "--precision", "bf16", "--output_dir", str(tmp_path),
                                  "--progress", "false", "--sanity", "false"])
    meta = report.data["meta"]
    assert meta["precision"] == "bf16-mixed" and meta["num_nodes"] == 1
    assert meta["fingerprint"]["precision"] == "bf16-mixed"  # never resumed into a 32-bit report
    assert report.data["robustness_score"] is not None


def test_a_cpu_run_shows_the_gallery_status_and_no_warnings(tiny_run, tmp_path):
    """A real eval.py process (the old spellings, progress on): the status line and the embedding
    bar come before the attacks' bar, and nothing else reaches stderr: no Lightning warnings."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), "--ckpt", str(tiny_run["ckpt"]), "--suite", str(tiny_run["suite"]),
         "--output-dir", str(tmp_path), "--no-sanity"],
        cwd=tiny_run["root"], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr.replace("\r", "\n")
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    assert lines[0] == "embedding the gallery (40 images) ...", lines[:3]
    assert any(line.startswith("embedding the gallery:") for line in lines)
    assert all(line.startswith(("embedding the gallery", "robustness:", "sanity checks:")) for line in lines), lines
    assert json.loads((tmp_path / f"{tiny_run['ckpt'].stem}.cli-test.json").read_text())["num_samples"] == 3


def test_no_status_or_bar_without_progress(tiny_run, tmp_path, capsys):
    eval_script.main(["--ckpt", str(tiny_run["ckpt"]), "--suite", str(tiny_run["suite"]), "--accelerator", "cpu",
                      "--output_dir", str(tmp_path), "--progress", "false", "--sanity", "false"])
    assert "embedding the gallery" not in capsys.readouterr().err
