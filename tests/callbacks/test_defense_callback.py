"""MaxShiftAdversarialTraining (ECCV 2020 Eq. 13): what the training step sees, what crafting leaves alone."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import TripletMarginLoss
from torch import nn

from robust_ranking.callbacks import MaxShiftAdversarialTraining
from robust_ranking.data import SyntheticDataModule
from robust_ranking.lightning_modules import LeNet, MetricRanker

BATCH = 16  # 4 classes x 4 samples; 64 training images -> 4 batches per epoch


class CapturingRanker(MetricRanker):
    """Records the images, indices and loss of every training step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        self.losses: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch_idx, batch.images.detach().clone(), batch.indices.clone()))
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.detach().clone())
        return loss


class BatchNormNet(nn.Module):
    """A tiny backbone with BatchNorm (running statistics) for the crafting-mode checks."""

    def __init__(self, embedding_dim: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 14 * 14, embedding_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make_ranker(backbone: nn.Module | None = None) -> CapturingRanker:
    torch.manual_seed(0)
    return CapturingRanker(
        backbone=backbone if backbone is not None else LeNet(embedding_dim=16),
        loss=TripletMarginLoss(margin=0.2, distance=CosineSimilarity()),
    )


def make_data() -> SyntheticDataModule:
    return SyntheticDataModule(batch_size=BATCH, samples_per_class=4, train_per_class=16, test_per_class=4)


def fit(module: pl.LightningModule, callbacks: list[pl.Callback], epochs: int = 1) -> tuple[pl.Trainer, SyntheticDataModule]:
    pl.seed_everything(0, verbose=False)
    data = make_data()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data)
    return trainer, data


def clean_images(data: SyntheticDataModule, indices: torch.Tensor) -> torch.Tensor:
    return data.train_set.images.index_select(0, indices).float().div(255.0)


def changed(seen_images: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: which images of the batch differ from their clean version."""
    return (seen_images != clean).flatten(1).any(dim=1)


# ----------------------------------------------------------------------------- construction
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eps": -0.1}, "eps must be in"),
        ({"eps": 1.5}, "eps must be in"),
        ({"eps": float("nan")}, "eps must be a finite"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"steps": 2.5}, "steps must be an integer >= 1"),
        ({"alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"alpha": -0.01}, "alpha must be a finite number > 0"),
        ({"mix_ratio": -0.1}, "mix_ratio must be a number in"),
        ({"mix_ratio": 1.1}, "mix_ratio must be a number in"),
        ({"warmup_epochs": -1}, "warmup_epochs must be an integer >= 0"),
        ({"ramp_epochs": -2}, "ramp_epochs must be an integer >= 0"),
        ({"random_start": "yes"}, "random_start must be a bool"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        MaxShiftAdversarialTraining(**kwargs)
    assert "\n" not in str(info.value) and str(info.value).startswith("MaxShiftAdversarialTraining: ")


def test_defaults_follow_the_eccv_rules():
    cb = MaxShiftAdversarialTraining()
    assert (cb.eps, cb.alpha, cb.steps, cb.mix_ratio) == (0.3, 0.01, 30, 1.0)
    small = MaxShiftAdversarialTraining(eps=0.03)
    assert small.alpha == pytest.approx(1 / 255) and small.steps == 15


def test_eps_schedule_warmup_then_per_step_ramp():
    cb = MaxShiftAdversarialTraining(eps=0.2, warmup_epochs=1, ramp_epochs=2)
    assert cb.current_eps(0, 3, 4) == 0.0
    assert cb.current_eps(1, 0, 4) == pytest.approx(0.2 * 0.25 / 2)
    assert cb.current_eps(2, 1, 4) == pytest.approx(0.2 * 1.5 / 2)
    assert cb.current_eps(2, 3, 4) == pytest.approx(0.2)
    assert cb.current_eps(7, 0, 4) == pytest.approx(0.2)
    assert cb.current_eps(1, 5, float("inf")) == pytest.approx(0.1)  # unknown epoch length: per epoch
    assert MaxShiftAdversarialTraining(eps=0.0).current_eps(3) == 0.0


def test_number_of_replaced_images_rounds_half_up():
    assert [MaxShiftAdversarialTraining(mix_ratio=r).num_adversarial(16) for r in (0.0, 0.3, 0.5, 1.0)] == [0, 5, 8, 16]
    assert MaxShiftAdversarialTraining(mix_ratio=0.5).num_adversarial(3) == 2


def test_refuses_a_module_without_the_ranker_contract():
    with pytest.raises(TypeError, match="needs a ranker with embed"):
        MaxShiftAdversarialTraining().setup(None, pl.LightningModule(), "fit")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the batch the step sees
def test_training_step_sees_the_adversarial_batch_and_logs():
    eps = 0.1
    module = make_ranker()
    trainer, data = fit(module, [MaxShiftAdversarialTraining(eps=eps, steps=2)])
    assert len(module.seen) == 4
    for _, _, images, indices in module.seen:
        clean = clean_images(data, indices)
        assert changed(images, clean).all(), "every image (anchors, positives, negatives) must be replaced"
        assert (images - clean).abs().max() <= eps + 1e-6
        assert images.min() >= 0.0 and images.max() <= 1.0
    metrics = trainer.callback_metrics
    for key in ("train/shift_distance_step", "train/shift_distance_epoch", "train/adv_loss_step",
                "train/adv_loss_epoch", "train/adv_eps_step"):
        assert key in metrics, key
    assert "train/clean_loss_step" not in metrics  # only when mixing
    assert metrics["train/shift_distance_step"] > 0
    assert metrics["train/adv_eps_step"] == pytest.approx(eps)
    # adv_loss is the loss the step trained on (reused from the step output, no extra forward).
    torch.testing.assert_close(metrics["train/adv_loss_step"], module.losses[-1])
    torch.testing.assert_close(metrics["train/adv_loss_step"], metrics["train/loss_step"])


def test_mix_ratio_replaces_the_right_number_of_images():
    module = make_ranker()
    trainer, data = fit(module, [MaxShiftAdversarialTraining(eps=0.1, steps=2, mix_ratio=0.3, seed=3)])
    masks = []
    for _, _, images, indices in module.seen:
        mask = changed(images, clean_images(data, indices))
        assert int(mask.sum()) == 5  # round(0.3 * 16)
        masks.append(mask)
    assert len({tuple(m.tolist()) for m in masks}) > 1, "the replaced positions are drawn per step"
    assert "train/clean_loss_step" in trainer.callback_metrics
    assert torch.isfinite(trainer.callback_metrics["train/clean_loss_step"])


# ----------------------------------------------------------------------------- what crafting leaves alone
class Probe(pl.Callback):
    """Snapshots BatchNorm buffers, parameter grads and modes at on_train_batch_start."""

    def __init__(self) -> None:
        self.snapshots: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.snapshots.append(
            {
                "buffers": {k: v.detach().clone() for k, v in pl_module.named_buffers()},
                "grads": {k: None if p.grad is None else p.grad.detach().clone()
                          for k, p in pl_module.named_parameters()},
                "requires_grad": {k: p.requires_grad for k, p in pl_module.named_parameters()},
                "modes": {k: m.training for k, m in pl_module.named_modules()},
            }
        )


def test_crafting_leaves_batchnorm_statistics_grads_and_modes_alone():
    before, after = Probe(), Probe()
    module = make_ranker(BatchNormNet())
    fit(module, [before, MaxShiftAdversarialTraining(eps=0.1, steps=3), after])
    assert len(before.snapshots) == len(after.snapshots) == 4
    for step, (b, a) in enumerate(zip(before.snapshots, after.snapshots)):
        assert b["buffers"].keys() == a["buffers"].keys() and "backbone.body.1.running_mean" in b["buffers"]
        for key in b["buffers"]:
            assert torch.equal(b["buffers"][key], a["buffers"][key]), f"step {step}: crafting changed {key}"
        for key, grad in b["grads"].items():
            if step == 0:
                assert a["grads"][key] is None, f"crafting left a .grad on {key}"
            else:  # the previous step's gradients, untouched by crafting
                assert grad is not None and torch.equal(grad, a["grads"][key]), key
        assert a["requires_grad"] == b["requires_grad"] and all(a["requires_grad"].values())
        assert a["modes"] == b["modes"] and all(a["modes"].values()), "train mode must be restored"
    # The probes are not vacuous: the training steps themselves do update the statistics.
    assert not torch.equal(after.snapshots[0]["buffers"]["backbone.body.1.running_mean"],
                           before.snapshots[1]["buffers"]["backbone.body.1.running_mean"])


# ----------------------------------------------------------------------------- vanilla equivalence
@pytest.fixture(scope="module")
def vanilla_run():
    module = make_ranker()
    _, data = fit(module, [], epochs=2)
    return module, data


def test_eps_zero_is_exactly_vanilla_training(vanilla_run):
    vanilla, _ = vanilla_run
    module = make_ranker()
    fit(module, [MaxShiftAdversarialTraining(eps=0.0)], epochs=2)
    assert len(module.losses) == len(vanilla.losses) == 8
    for got, expected in zip(module.losses, vanilla.losses):
        assert torch.equal(got, expected)
    for (name, p), q in zip(module.state_dict().items(), vanilla.state_dict().values()):
        assert torch.equal(p, q), name


def test_warmup_epochs_are_vanilla_then_the_ramp_applies(vanilla_run):
    vanilla, data = vanilla_run
    eps = 0.2
    callback = MaxShiftAdversarialTraining(eps=eps, steps=2, warmup_epochs=1, ramp_epochs=1)
    module = make_ranker()
    fit(module, [callback], epochs=2)
    for epoch, batch_idx, images, indices in module.seen:
        clean = clean_images(data, indices)
        if epoch == 0:
            assert torch.equal(images, clean)
        else:
            eps_now = callback.current_eps(epoch, batch_idx, 4)
            assert eps_now == pytest.approx(eps * (batch_idx + 1) / 4)
            assert changed(images, clean).all()
            assert (images - clean).abs().max() <= eps_now + 1e-6
    for got, expected in zip(module.losses[:4], vanilla.losses[:4]):  # the warm-up epoch
        assert torch.equal(got, expected)
    assert not torch.equal(module.losses[4], vanilla.losses[4])
