"""The defended configs (CTD / ETD) and the defense overlay (configs/defenses/max_shift.yaml) run through
train.py, and the callback trains under 2-process CPU DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from robust_ranking.cli import train
from robust_ranking.callbacks import MaxShiftAdversarialTraining
from robust_ranking.data import write_idx_ubyte
from run_helpers import REPO, defense_ddp_config

DEFENDED_CONFIGS = ["fashion_mnist_ctd.yaml", "mnist_ctd.yaml", "fashion_mnist_etd.yaml"]


def fake_mnist_tree(root: Path, train_per_class: int = 8, test_per_class: int = 4) -> Path:
    """A tiny MNIST-like IDX tree (10 classes of noisy per-class templates)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    templates = rng.integers(0, 256, size=(10, 28, 28))
    for prefix, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.arange(10 * per_class) % 10
        noise = rng.integers(-40, 41, size=(labels.size, 28, 28))
        images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
        write_idx_ubyte(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx_ubyte(root / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    return root


@pytest.mark.parametrize("name", [*DEFENDED_CONFIGS, "stack:et+mnist+max_shift"])
def test_defended_config_parses_and_runs_fast_dev_run(name, tmp_path, monkeypatch):
    if name.startswith("stack:"):  # the defense overlay on a model / data pair no paper config names
        config_args = ["--config", str(REPO / "configs/models/et.yaml"), "--data", str(REPO / "configs/data/mnist.yaml"),
                       "--trainer.callbacks", str(REPO / "configs/defenses/max_shift.yaml")]
    else:
        config = REPO / "configs" / name
        spec = yaml.safe_load(config.read_text())  # a named stack: model overlay + data + the defense overlay
        assert spec["trainer.callbacks"] == "defenses/max_shift.yaml"
        assert spec["trainer.logger.init_args.name"] == name.removesuffix(".yaml")
        config_args = ["--config", str(config)]
    monkeypatch.chdir(tmp_path)  # runs/ and the saved config land in tmp_path
    root = fake_mnist_tree(tmp_path / "idx")
    # Only the data sizes are shrunk; the callback keeps the paper's strongest adversary.
    cli = train.main([
        "fit", *config_args, "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu",
        "--data.root", str(root), "--data.batch_size", "16", "--data.samples_per_class", "4",
        "--data.eval_batch_size", "40",
    ])
    checkpoint = cli.trainer.checkpoint_callback  # a defended run keeps every epoch (docs/defense.md)
    assert checkpoint.save_top_k == -1 and checkpoint.monitor is None
    defenses = [cb for cb in cli.trainer.callbacks if isinstance(cb, MaxShiftAdversarialTraining)]
    assert len(defenses) == 1
    cb = defenses[0]
    assert (cb.eps, cb.alpha, cb.steps, cb.random_start, cb.mix_ratio) == (0.3, 0.01, 30, False, 1.0)
    metrics = cli.trainer.callback_metrics
    assert metrics["train/adv_eps_step"] == pytest.approx(0.3)
    assert metrics["train/shift_distance_step"] > 0
    assert torch.isfinite(metrics["train/adv_loss_step"])
    assert "val/recall@1" in metrics




@pytest.mark.slow
def test_two_process_cpu_ddp_fit_with_the_callback(tmp_path):
    config = tmp_path / "ddp.yaml"
    config.write_text(defense_ddp_config(
        tmp_path / "runs", "{class_path: robust_ranking.callbacks.MaxShiftAdversarialTraining, "
                           "init_args: {eps: 0.1, steps: 2, mix_ratio: 0.5}}"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "fit", "--config", str(config),
         "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_dir,) = [p.parent for p in (tmp_path / "runs" / "ddp_defense").rglob("events.out.tfevents.*")]
    events = EventAccumulator(str(event_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/shift_distance_step", "train/adv_loss_step", "train/clean_loss_step", "train/adv_eps_step"):
        assert tag in tags, f"{tag} not logged; got {sorted(tags)}"
    # 64 training images, 2 ranks x 16 per batch -> 2 steps, each crafted on both ranks.
    shifts = [e.value for e in events.Scalars("train/shift_distance_step")]
    assert len(shifts) == 2 and all(s > 0 for s in shifts)
