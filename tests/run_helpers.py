"""Helpers of the tests: tiny rankers, a plain training loop for them, tiny train.py / eval.py runs and
the config they use, and the parsing helper of the config tests (shared by every test package)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import TripletMarginLoss
from torch import nn

from robust_ranking.cli import train
from robust_ranking.data import SyntheticDataModule
from robust_ranking.lightning_modules import LeNet, MetricRanker

#: The repository root (tests/ is directly under it).
REPO = Path(__file__).resolve().parents[1]


@dataclass
class TinyRanker:
    """A LeNet(16-d) cosine-triplet ranker and its synthetic data (|X| = 100, 4 classes)."""

    model: MetricRanker
    datamodule: SyntheticDataModule


def train_tiny_ranker(epochs: int = 2, seed: int = 0) -> TinyRanker:
    """Train ``LeNet(embedding_dim=16)`` for a few steps (well under a second, one thread)."""
    datamodule = SyntheticDataModule(test_per_class=25, eval_batch_size=64, seed=seed)
    datamodule.setup()
    torch.manual_seed(seed)
    model = MetricRanker(LeNet(embedding_dim=16), TripletMarginLoss(margin=0.2, distance=CosineSimilarity()))
    fit_with_adam(model, datamodule, epochs)
    model.eval()
    for p in model.parameters():
        p.grad = None
    return TinyRanker(model, datamodule)


def fit_with_adam(model: nn.Module, datamodule: Any, epochs: int, lr: float = 1e-3) -> None:
    """Train a ranker outside Lightning: Adam over the data module's training batches, the
    ranker's own loss on its embeddings (the tests' tiny models train in well under a second)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for images, labels, _ in datamodule.train_dataloader():
            loss = model.compute_loss(model.embed(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def train_in(root: Path, args: list[str]) -> None:
    """``train.py <args>`` with ``root`` as the working directory, so ``runs/`` lands there."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        train.main(args)
    finally:
        os.chdir(cwd)


def report_numbers(report: dict[str, Any]) -> dict[str, Any]:
    """An eval.py report without its wall times (which differ from run to run)."""
    results = [{k: v for k, v in r.items() if k != "wall_s"} for r in report["results"]]
    return {"results": results, "clean": report["clean"], "score": report["robustness_score"],
            "T": report["num_samples"], "indices": report["attacked_indices"],
            "clean_query_database": report.get("clean_query_database")}


def tiny_config(test_per_class: int = 25, eval_batch_size: int = 64) -> str:
    """The ``train.py`` config of the tests' tiny CLI-trained ranker: LeNet(16-d), cosine triplet,
    synthetic data (4 classes), one epoch, logged to ``runs/tiny``."""
    return _TINY_CONFIG % {"test_per_class": test_per_class, "eval_batch_size": eval_batch_size}


_TINY_CONFIG = """seed_everything: 0
trainer:
  max_epochs: 1
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
  logger:
    class_path: pytorch_lightning.loggers.TensorBoardLogger
    init_args: {save_dir: runs, name: tiny}
model:
  class_path: robust_ranking.lightning_modules.MetricRanker
  init_args:
    backbone:
      class_path: robust_ranking.lightning_modules.LeNet
      init_args: {embedding_dim: 16}
    loss:
      class_path: pytorch_metric_learning.losses.TripletMarginLoss
      init_args:
        margin: 0.2
        distance: {class_path: pytorch_metric_learning.distances.CosineSimilarity}
data:
  class_path: robust_ranking.data.SyntheticDataModule
  init_args: {test_per_class: %(test_per_class)d, eval_batch_size: %(eval_batch_size)d}
"""

TINY_CONFIG = tiny_config()

# T = 21 is odd: under 2 processes one rank attacks 11 samples, the other 10 (+ padding).
EVAL_SUITE = """name: eval-test
num_samples: 21
seed: 0
batch_size: 8
attacks:
  - {attack: CA+, epsilons: [0.1], w: [1, 2], steps: 3}
  - {attack: CA-, epsilons: [0.1], w: [1], steps: 2}
  - {attack: QA-, epsilons: [0.1], m: [1], steps: 3}
  - {attack: ES, epsilons: [0.1], steps: 3}
"""


def train_tiny_run(root: Path) -> dict[str, Path]:
    """``train.py fit`` of :data:`TINY_CONFIG` in ``root``: ``<run>/checkpoints/*.ckpt``, ``<run>/config.yaml``
    and :data:`EVAL_SUITE` written next to it."""
    (root / "tiny.yaml").write_text(TINY_CONFIG)
    (root / "suite.yaml").write_text(EVAL_SUITE)
    train_in(root, ["fit", "--config", str(root / "tiny.yaml")])
    run = root / "runs" / "tiny" / "version_0"
    (ckpt,) = (run / "checkpoints").glob("*.ckpt")
    assert (run / "config.yaml").is_file()
    return {"root": root, "run": run, "ckpt": ckpt, "suite": root / "suite.yaml"}


def run_eval(args: list[str]) -> list:
    """``eval.py <args>`` on the CPU without progress bars, in this process."""
    from robust_ranking.cli import eval as eval_script

    return eval_script.main([*args, "--accelerator", "cpu", "--no-progress"])


def strip_timing(report: dict) -> dict:
    """The numbers of a report, without wall times (which differ from run to run)."""
    results = [{k: v for k, v in r.items() if k != "wall_s"} for r in report["results"]]
    return {"results": results, "clean": report["clean"], "score": report["robustness_score"],
            "T": report["num_samples"], "indices": report["attacked_indices"]}


def resolved_config(*args: str, subcommand: str = "fit") -> dict:
    """What ``train.py <subcommand> <args> --print_config`` prints, as a dict (parsing only: no data,
    no model is built)."""
    import contextlib
    import io

    import pytest
    import yaml

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        train.main([subcommand, *args, "--print_config"])
    assert exit_info.value.code in (0, None), f"train.py {subcommand} {' '.join(args)} failed"
    return yaml.safe_load(out.getvalue())
