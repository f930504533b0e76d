"""WarmStart: a fit starts from another checkpoint's weights, with a fresh optimizer and schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import TripletMarginLoss

from robust_ranking.cli import train
from robust_ranking.callbacks import WarmStart
from robust_ranking.data import SyntheticDataModule
from robust_ranking.lightning_modules import LeNet, MetricRanker
from run_helpers import REPO



def make_ranker(seed: int, embedding_dim: int = 16) -> MetricRanker:
    torch.manual_seed(seed)
    return MetricRanker(
        backbone=LeNet(embedding_dim=embedding_dim),
        loss=TripletMarginLoss(margin=0.2, distance=CosineSimilarity()),
    )


def make_data() -> SyntheticDataModule:
    return SyntheticDataModule(batch_size=16, samples_per_class=4, train_per_class=16, test_per_class=4)


def make_trainer(tmp_path: Path, callbacks: list[pl.Callback], **kwargs) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 1)
    return pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=callbacks, **kwargs)


class StateAtFitStart(pl.Callback):
    """Copies the weights and the optimizer's learning rate when training is about to begin."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.epoch = trainer.current_epoch


@pytest.fixture
def source_ckpt(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A one-epoch run's checkpoint and its weights."""
    model = make_ranker(seed=1)
    trainer = make_trainer(tmp_path / "source", [])
    trainer.fit(model, datamodule=make_data())
    path = tmp_path / "source.ckpt"
    trainer.save_checkpoint(path)
    return path, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fit_starts_from_the_checkpoint_weights_with_a_fresh_run(tmp_path, source_ckpt):
    path, weights = source_ckpt
    model = make_ranker(seed=2)
    assert not all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    probe = StateAtFitStart()
    trainer = make_trainer(tmp_path / "warm", [WarmStart(str(path)), probe])
    trainer.fit(model, datamodule=make_data())
    assert probe.state.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(probe.state[key], value), key
    # Fresh run: epoch 0 and the configured learning rate, not the source run's state.
    assert probe.epoch == 0
    assert probe.lr == pytest.approx(1e-3)
    assert trainer.global_step > 0


def test_a_plain_state_dict_file_works_and_strict_false_skips_extra_keys(tmp_path, source_ckpt):
    _, weights = source_ckpt
    extra = dict(weights, **{"not_a_layer.weight": torch.zeros(3)})
    path = tmp_path / "plain.pt"
    torch.save(extra, path)
    model = make_ranker(seed=2)
    with pytest.raises(ValueError, match="does not fit MetricRanker.*strict=False"):
        make_trainer(tmp_path / "strict", [WarmStart(str(path))]).fit(model, datamodule=make_data())
    probe = StateAtFitStart()
    make_trainer(tmp_path / "loose", [WarmStart(str(path), strict=False), probe]).fit(
        make_ranker(seed=2), datamodule=make_data())
    for key, value in weights.items():
        assert torch.equal(probe.state[key], value), key


def test_a_checkpoint_of_another_shape_is_refused(tmp_path, source_ckpt):
    path, _ = source_ckpt
    with pytest.raises(ValueError, match="does not fit"):
        make_trainer(tmp_path, [WarmStart(str(path))]).fit(make_ranker(seed=0, embedding_dim=8), datamodule=make_data())


def test_missing_file_and_resume_together_are_refused(tmp_path, source_ckpt):
    path, _ = source_ckpt
    with pytest.raises(FileNotFoundError, match="does not exist"):
        WarmStart(str(tmp_path / "nope.ckpt"))
    trainer = make_trainer(tmp_path, [WarmStart(str(path))], max_epochs=2)
    with pytest.raises(ValueError, match="WarmStart and --ckpt_path"):
        trainer.fit(make_ranker(seed=2), datamodule=make_data(), ckpt_path=str(path), weights_only=False)


def test_the_documented_cli_form_appends_a_warm_start(tmp_path, source_ckpt, monkeypatch):
    path, weights = source_ckpt
    monkeypatch.chdir(tmp_path)
    cli = train.main([
        "fit", "--config", str(REPO / "configs/fashion_mnist_ctd.yaml"),
        "--data", "robust_ranking.data.SyntheticDataModule", "--data.batch_size", "16", "--data.samples_per_class", "4",
        "--data.eval_batch_size", "64", "--model.init_args.backbone", "robust_ranking.lightning_modules.LeNet",
        "--model.init_args.backbone.init_args.embedding_dim", "16",
        "--trainer.callbacks.init_args.steps", "1",  # the defense (last callback) before the append
        "--trainer.callbacks+=WarmStart", "--trainer.callbacks.init_args.ckpt_path", str(path),
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "0",
    ])
    warm = [c for c in cli.trainer.callbacks if isinstance(c, WarmStart)]
    assert len(warm) == 1 and warm[0].ckpt_path == path
    defense = [c for c in cli.trainer.callbacks if type(c).__name__ == "MaxShiftAdversarialTraining"]
    assert defense[0].steps == 1
    # No training batch ran: the model holds exactly the warm-start weights.
    for key, value in weights.items():
        assert torch.equal(cli.model.state_dict()[key].cpu(), value), key
