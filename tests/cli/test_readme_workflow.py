"""The README's benchmarking workflow, run as written on Fashion-MNIST: train two rankers, benchmark
both with one suite, rebuild the comparison from the reports. Only the budget is cut (2 training
batches, 1 epoch; 8 attacked samples, no sanity checks) and the commands run in a fresh folder, so
`configs/...` resolves to the shipped configs as it does for an installed package."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from robust_ranking.cli import eval as eval_script
from robust_ranking.cli import train
from run_helpers import REPO

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

TRAIN_BUDGET = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2"]
EVAL_BUDGET = ["--num_samples", "8", "--sanity", "false", "--progress", "false"]


def workflow_commands() -> list[list[str]]:
    """The command lines between the README's ``<!-- workflow -->`` markers (continuations joined)."""
    text = REPO.joinpath("README.md").read_text()
    block = re.search(r"<!-- workflow -->\n```bash\n(.*?)```\n<!-- /workflow -->", text, re.S)
    assert block, "README.md has no workflow block"
    joined = block.group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def run_script(path: Path, args: list[str]) -> None:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(args)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="needs the dataset-fashion-mnist package (make dataset)")
def test_the_readme_workflow_runs_as_written(tmp_path, monkeypatch):
    commands = workflow_commands()
    assert [c[1] for c in commands] == ["train.py", "train.py", "eval.py", "scripts/robustness_comparison.py"]
    monkeypatch.chdir(tmp_path)  # no configs/ here: the shipped ones are found
    for python, program, *args in commands:
        assert python == ".venv/bin/python"
        if program == "train.py":
            train.main([*args, *TRAIN_BUDGET])
        elif program == "eval.py":
            eval_script.main([*args, *EVAL_BUDGET])
        else:
            run_script(REPO / program, args)

    out = tmp_path / "runs" / "benchmark"
    names = ["fashion_mnist_ct.version_0.last.quick", "fashion_mnist_et.version_0.last.quick"]
    for name in names:
        report = json.loads((out / f"{name}.json").read_text())
        assert report["num_samples"] == 8 and report["robustness_score"] is not None
        assert (out / f"{name}.curves.png").is_file() and (out / f"{name}.md").is_file()
        tags = EventAccumulator(str(out / "tensorboard" / name)).Reload().Tags()
        assert "robust/score" in tags["scalars"] and any(t.startswith("robust_images/") for t in tags["images"])
    comparison = (out / "comparison.md").read_text()
    assert "fashion_mnist_ct/version_0/last" in comparison and "fashion_mnist_et/version_0/last" in comparison
    labelled = (out / "ct_vs_et.md").read_text()
    assert "| CT" in labelled or " CT " in labelled
    assert " ET " in labelled or "| ET" in labelled
