"""train.py end to end: every config runs, logs reach TensorBoard, DDP matches one process,
and bad input gives one clear line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from robust_ranking.cli import train
from robust_ranking.data.idx_format import write_idx_ubyte
from robust_ranking.lightning_modules import MetricRanker, load_ranker
from run_helpers import DML_CLASSES, REPO, fabricate_dml_tree

# The paper configs (the CUB / Cars / SOP ones on tiny fabricated trees); through their includes they use every
# overlay under configs/ (tests/configs/test_configs.py).
MODEL_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# Overlay stacks as the README writes them (model + data [+ defense] [+ budget]), including combinations
# no paper config names.
STACKS = {
    "lenet-mnist-quickstart": ["--config", "configs/models/ct_lenet.yaml", "--data", "configs/data/mnist.yaml",
                               "--config", "configs/budgets/quickstart.yaml"],
    "dch32-hashing": ["--config", "configs/models/dch.yaml", "--data", "configs/data/fashion_mnist_hashing.yaml",
                      "--model.init_args.hash_bits", "32"],
    "dpqn16-pq-quickstart": ["--config", "configs/models/dpqn.yaml", "--data", "configs/data/fashion_mnist_pq.yaml",
                             "--model.init_args.num_bits", "16", "--config", "configs/budgets/quickstart.yaml"],
}
# A tiny, fast variant of any model config: synthetic data, small embedding, no real dataset.
TINY = [
    "--data", "robust_ranking.data.SyntheticDataModule",
    "--data.batch_size", "16", "--data.samples_per_class", "4", "--data.eval_batch_size", "64",
    "--model.init_args.backbone.init_args.embedding_dim", "16",
]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the CLI from a temporary directory so runs/ and config.yaml land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fake_mnist_root(root: Path, n_train: int = 300, n_test: int = 200) -> Path:
    """A small MNIST-format IDX tree (there is no MNIST on the CI machine)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = (rng.random((n, 28, 28)) * 60 + labels[:, None, None] * 19).astype(np.uint8)
        write_idx_ubyte(root / f"{split}-images-idx3-ubyte", images)
        write_idx_ubyte(root / f"{split}-labels-idx1-ubyte", labels)
    return root


def run_fast_dev_run(config_args: list[str], tmp: Path) -> None:
    args = ["fit", *config_args, "--trainer.fast_dev_run", "1", "--data.eval_batch_size", "250"]
    if any(Path(a).name.startswith("mnist") for a in config_args):  # mnist_*.yaml, configs/data/mnist.yaml
        args += ["--data.root", str(fake_mnist_root(tmp / "mnist"))]
    dml = next((k for a in config_args for k in DML_CLASSES if Path(a).name.startswith(f"{k}_")), None)
    if dml is not None:  # cub_*.yaml, cars_*.yaml, sop_*.yaml: a tiny tree in the official layout, small batches
        fabricate_dml_tree(dml, tmp / dml, per_class=3)  # 9 test images: QA+ needs m + G = 6 candidates
        args += ["--data.root", str(tmp / dml), "--data.batch_size", "4", "--data.eval_batch_size", "6",
                 "--data.num_workers", "0"]
        if any(Path(a).name.endswith("_ctd.yaml") for a in config_args):
            # the defense's loop, not its 32 steps; the robustness check's 32-step attacks on 64x64 crops
            args += ["--trainer.callbacks.init_args.steps", "2", "--data.image_size", "64"]
    cli = train.main(args)
    metrics = cli.trainer.callback_metrics
    assert {"val/recall@1", "val/map", "val/map@r", "val/nmi"} <= set(metrics)
    assert torch.isfinite(metrics["train/loss_step"])


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_every_config_parses_and_runs_fast_dev_run(config, in_tmp):
    run_fast_dev_run(["--config", str(config)], in_tmp)


@pytest.mark.parametrize("stack", STACKS.values(), ids=list(STACKS))
def test_overlay_stacks_run_fast_dev_run(stack, in_tmp):
    run_fast_dev_run([str(REPO / a) if a.startswith("configs/") else a for a in stack], in_tmp)


def test_print_config_works(in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["fit", "--config", str(REPO / "configs/fashion_mnist_ct.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: robust_ranking.lightning_modules.MetricRanker" in out
    assert "use_distributed_sampler: false" in out


def test_quickstart_budget_overrides_the_model_config(in_tmp, capsys):
    with pytest.raises(SystemExit):
        train.main([
            "fit", "--config", str(REPO / "configs/fashion_mnist_ct.yaml"),
            "--config", str(REPO / "configs/budgets/quickstart.yaml"), "--print_config",
        ])
    out = capsys.readouterr().out
    assert re.search(r"max_epochs: 2\b", out) and re.search(r"T_max: 2\b", out)


def test_tensorboard_has_train_loss_and_validation_metrics(in_tmp):
    cli = train.main([
        "fit", "--config", str(REPO / "configs/fashion_mnist_ct.yaml"), *TINY,
        "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1",
    ])
    log_dir = Path(cli.trainer.logger.log_dir).resolve()
    assert log_dir.parent.parent == in_tmp / "runs"
    assert list((log_dir / "checkpoints").glob("*.ckpt")), "checkpoints live in the run directory"
    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss_step", "val/recall@1", "val/map", "val/map@r", "val/nmi"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert len(events.Scalars("val/recall@1")) == 2  # one per epoch
    values = [e.value for e in events.Scalars("val/map")]
    assert all(0.0 <= v <= 1.0 for v in values)

    # The checkpoint records its model config: load_ranker rebuilds the same model.
    ckpt = log_dir / "checkpoints" / "last.ckpt"
    restored = load_ranker(str(ckpt))
    assert type(restored) is MetricRanker and cli.model.hparams["backbone"]["class_path"].endswith("C2F1")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for name, value in restored.state_dict().items():
        torch.testing.assert_close(value, saved[name])


def test_load_ranker_refuses_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_ranker(str(tmp_path / "missing.ckpt"))
    torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="no model class_path"):
        load_ranker(str(tmp_path / "bare.ckpt"))
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "torch.nn.Linear"}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a robust_ranking.lightning_modules.Ranker"):
        load_ranker(str(tmp_path / "other.ckpt"))


def test_training_is_seeded(in_tmp):
    def final_loss() -> float:
        cli = train.main(["fit", "--config", str(REPO / "configs/fashion_mnist_ct.yaml"), *TINY,
                          "--trainer.max_epochs", "1", "--trainer.logger", "false",
                          "--trainer.callbacks", "[]"])
        return float(cli.trainer.callback_metrics["train/loss_epoch"])

    assert final_loss() == final_loss()


# ----------------------------------------------------------------------------- errors
def run_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


# Bad class names, keys and paths (one line on stderr, exit 2): rows of tests/cli/test_bad_input.py.


# ------------------------------------------------------------------------------- DDP
METRIC_LINE = re.compile(r"^\s+(val/\S+)\s+([0-9.]+)$", re.MULTILINE)


@pytest.mark.slow
def test_two_process_ddp_fit_and_validation_equals_single_process(tmp_path):
    """A 2-process gloo DDP fit runs; validating its checkpoint on 2 processes gives exactly
    the metrics of 1 process (DistributedSampler padding is de-duplicated by sample index)."""
    common = ["--config", str(REPO / "configs/fashion_mnist_ct.yaml"), *TINY,
              # 60 test images: not divisible by 2 x 16, so the sampler pads
              "--data.init_args.test_per_class", "15", "--data.eval_batch_size", "16",
              "--trainer.accelerator", "cpu"]
    fit = run_train("fit", *common, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                    "--trainer.max_epochs", "1", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))

    results = {}
    for devices in ("1", "2"):
        args = ["validate", *common, "--trainer.devices", devices, "--ckpt_path", str(ckpt),
                "--trainer.logger", "false"]
        if devices == "2":
            args += ["--trainer.strategy", "ddp"]
        proc = run_train(*args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = dict(METRIC_LINE.findall(proc.stdout))
    assert {"val/recall@1", "val/map", "val/map@r", "val/nmi"} <= set(results["1"])
    assert results["1"] == results["2"]


def test_shipped_configs_are_found_outside_a_checkout(tmp_path, monkeypatch, capsys):
    """From a folder without ``configs/`` (an installed package), ``--config`` with a shipped config path reads the
    shipped file; a file that exists where the program runs always wins."""
    monkeypatch.chdir(tmp_path)
    assert train.shipped_config_args(["fit", "--config", "configs/no-such-file.yml"]) == ["fit", "--config", "configs/no-such-file.yml"]
    with pytest.raises(SystemExit) as info:
        train.main(["fit", "--config", "configs/fashion_mnist_ct.yaml", "--config=budgets/quickstart.yaml",
                    "--print_config"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "robust_ranking.lightning_modules.MetricRanker" in printed and "max_epochs: 2" in printed
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "fashion_mnist_ct.yaml").write_text("trainer: {max_epochs: 1}\n")
    assert train.shipped_config_args(["--config", "configs/fashion_mnist_ct.yaml"]) == [
        "--config", "configs/fashion_mnist_ct.yaml"]
