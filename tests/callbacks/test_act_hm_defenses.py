"""ACT (RobRank, TPAMI) and HM (RobDML, CVPR 2022) callbacks: the batch the step sees, what crafting leaves
alone, vanilla equivalence when off, the gradual adversary and ICS, other ranker families, DDP."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import TripletMarginLoss
from torch import nn

from robust_ranking.callbacks import AntiCollapseTripletTraining, HardnessManipulationTraining
from robust_ranking.callbacks.triplet_adversarial_training import anchor_positive_pairs, mine_triplets
from robust_ranking.data import SyntheticDataModule
from robust_ranking.lightning_modules import DCHRanker, LeNet, MetricRanker
from robust_ranking.lightning_modules.dch_loss import DCHLoss
from run_helpers import REPO, defense_ddp_config

BATCH = 16  # 4 classes x 4 samples -> 8 SPC-2 pairs -> 8 triplets -> 24 images per crafted step
TRIPLETS = 8


class CapturingRanker(MetricRanker):
    """Records the images, labels, indices and loss of every training step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.losses: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch.images.detach().clone(), batch.labels.clone(),
                          batch.indices.clone()))
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.detach().clone())
        return loss


class BatchNormNet(nn.Module):
    def __init__(self, embedding_dim: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(4 * 14 * 14, embedding_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make_ranker(backbone: nn.Module | None = None) -> CapturingRanker:
    torch.manual_seed(0)
    return CapturingRanker(backbone=backbone if backbone is not None else LeNet(embedding_dim=16),
                           loss=TripletMarginLoss(margin=0.2, distance=CosineSimilarity()))


def fit(module: pl.LightningModule, callbacks: list[pl.Callback], epochs: int = 1):
    pl.seed_everything(0, verbose=False)
    data = SyntheticDataModule(batch_size=BATCH, samples_per_class=4, train_per_class=16, test_per_class=4)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, limit_val_batches=0,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=callbacks)
    trainer.fit(module, datamodule=data)
    return trainer, data


def clean_images(data: SyntheticDataModule, indices: torch.Tensor) -> torch.Tensor:
    return data.train_set.images.index_select(0, indices).float().div(255.0)


def changed(seen: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    return (seen != clean).flatten(1).any(dim=1)


def check_triplet_layout(labels: torch.Tensor) -> None:
    t = labels.numel() // 3
    assert labels.numel() == 3 * TRIPLETS
    assert torch.equal(labels[:t], labels[t:2 * t]), "positives share the anchor's class"
    assert (labels[:t] != labels[2 * t:]).all(), "negatives are of another class"


# ----------------------------------------------------------------------------- construction
@pytest.mark.parametrize("cls", [AntiCollapseTripletTraining, HardnessManipulationTraining])
@pytest.mark.parametrize("kwargs, message", [
    ({"eps": -0.1}, "eps must be a number in"), ({"eps": 1.5}, "eps must be a number in"),
    ({"eps": float("nan")}, "eps must be a number in"), ({"alpha": 0.0}, "alpha must be a finite number > 0"),
    ({"steps": 0}, "steps must be an integer >= 1"), ({"steps": 2.5}, "steps must be an integer >= 1"),
    ({"margin": 0}, "margin must be a finite number > 0"), ({"warmup_epochs": -1}, "warmup_epochs must be"),
    ({"seed": "x"}, "seed must be an integer"),
])
def test_bad_arguments_are_refused_at_construction(cls, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        cls(**kwargs)
    assert "\n" not in str(info.value) and str(info.value).startswith(f"{cls.__name__}: ")


@pytest.mark.parametrize("cls, kwargs, message", [
    (AntiCollapseTripletTraining, {"strategy": "hard"}, "strategy must be one of random, semihard, softhard"),
    (HardnessManipulationTraining, {"source": "lga"}, "source must be one of"),
    (HardnessManipulationTraining, {"destination": "max"}, "destination must be one of random, semihard, softhard, lga"),
    (HardnessManipulationTraining, {"ics_weight": -0.5}, "ics_weight must be a finite number >= 0"),
])
def test_bad_strategies_are_refused(cls, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        cls(**kwargs)
    assert "\n" not in str(info.value)


def test_defaults_are_the_papers_28x28_settings():
    act, hm = AntiCollapseTripletTraining(), HardnessManipulationTraining()
    assert (act.eps, act.alpha, act.steps, act.strategy) == (77 / 255, 3 / 255, 32, "random")
    assert (hm.source, hm.destination, hm.margin, hm.ics_weight) == ("softhard", "lga", 0.2, 0.5)


def test_refuses_a_module_without_the_ranker_contract():
    for cls in (AntiCollapseTripletTraining, HardnessManipulationTraining):
        with pytest.raises(TypeError, match="needs a ranker with embed"):
            cls().setup(None, pl.LightningModule(), "fit")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- mining
def test_spc2_pairs_and_miners_follow_robrank():
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 2, 2, 1, 1])
    a, p = anchor_positive_pairs(labels)
    assert a.tolist() == [0, 2, 4, 6, 8] and p.tolist() == [1, 3, 5, 7, 9]
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(10, 8), dim=1)
    d = 1 - emb @ emb.T
    for strategy in ("random", "semihard", "softhard"):
        anc, pos, neg = mine_triplets(d, labels, strategy, 0.2, torch.Generator().manual_seed(1))
        assert torch.equal(labels[anc], labels[pos]) and (labels[anc] != labels[neg]).all() and (anc != pos).all()
    anc, pos, neg = mine_triplets(d, labels, "semihard", 0.5, torch.Generator().manual_seed(1))
    for i in range(len(anc)):
        other = labels != labels[anc[i]]
        d_ap = d[anc[i], pos[i]]
        semihard = other & (d[anc[i]] > d_ap) & (d[anc[i]] < d_ap + 0.5)
        if semihard.any():
            assert semihard[neg[i]], "a semihard negative is chosen whenever one exists"


# ----------------------------------------------------------------------------- the batch the step sees
def test_act_step_trains_on_clean_anchors_and_collapsed_positives_negatives():
    eps = 0.1
    module = make_ranker()
    trainer, data = fit(module, [AntiCollapseTripletTraining(eps=eps, alpha=0.02, steps=3)])
    assert len(module.seen) == 4
    for _, images, labels, indices in module.seen:
        check_triplet_layout(labels)
        clean = clean_images(data, indices)
        assert torch.equal(images[:TRIPLETS], clean[:TRIPLETS]), "anchors stay clean"
        assert changed(images[TRIPLETS:], clean[TRIPLETS:]).all(), "positives and negatives are perturbed"
        assert (images - clean).abs().max() <= eps + 1e-6 and images.min() >= 0 and images.max() <= 1
    m = trainer.callback_metrics
    assert m["train/act_pn_distance_step"] < m["train/act_pn_distance_clean_step"], "PGD collapses p and n"
    assert m["train/adv_eps_step"] == pytest.approx(eps)
    torch.testing.assert_close(m["train/adv_loss_step"], module.losses[-1])


def test_hm_step_trains_on_manipulated_triplets_and_logs():
    eps = 0.1
    module = make_ranker()
    trainer, data = fit(module, [HardnessManipulationTraining(eps=eps, alpha=0.02, steps=3, ics_weight=0.5)])
    for _, images, labels, indices in module.seen:
        check_triplet_layout(labels)
        clean = clean_images(data, indices)
        assert (images - clean).abs().max() <= eps + 1e-6 and images.min() >= 0 and images.max() <= 1
    assert any(changed(images, clean_images(data, indices)).any() for _, images, _, indices in module.seen)
    m = trainer.callback_metrics
    for key in ("hm_source_hardness", "hm_destination_hardness", "hm_adv_hardness", "hm_pgd_steps", "ics_loss",
                "adv_loss"):
        assert f"train/{key}_step" in m, key
    assert m["train/hm_adv_hardness_step"] >= m["train/hm_source_hardness_step"] - 1e-6
    assert -0.2 <= float(m["train/hm_destination_hardness_step"]) <= 0.0  # g_LGA in [-margin, 0]


def test_hm_with_source_equal_to_destination_perturbs_nothing():
    module = make_ranker()
    _, data = fit(module, [HardnessManipulationTraining(eps=0.1, steps=3, source="random", destination="random",
                                                        ics_weight=0.0)])
    for _, images, labels, indices in module.seen:
        check_triplet_layout(labels)
        assert torch.equal(images, clean_images(data, indices))


def test_gradual_adversary_follows_the_previous_loss_and_resumes():
    cb = HardnessManipulationTraining(margin=0.2)
    assert cb.gradual_hardness() == pytest.approx(-0.2)  # initial loss 2.0: the weakest destination
    cb._after_step(0.05, crafted=True)
    assert cb.gradual_hardness() == pytest.approx(-0.05)
    cb._after_step(-1.0, crafted=True)
    assert cb.gradual_hardness() == 0.0
    cb._after_step(0.3, crafted=False)  # vanilla steps do not move it
    assert cb.previous_loss == -1.0
    other = HardnessManipulationTraining()
    other.load_state_dict(cb.state_dict())
    assert other.previous_loss == -1.0
    module = make_ranker()
    hm = HardnessManipulationTraining(eps=0.1, steps=2, ics_weight=0.0)
    fit(module, [hm])
    assert hm.previous_loss == pytest.approx(float(module.losses[-1]))


# ----------------------------------------------------------------------------- what crafting leaves alone
class Probe(pl.Callback):
    def __init__(self) -> None:
        self.snapshots: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.snapshots.append({
            "buffers": {k: v.detach().clone() for k, v in pl_module.named_buffers()},
            "grads": {k: None if p.grad is None else p.grad.detach().clone() for k, p in pl_module.named_parameters()},
            "requires_grad": {k: p.requires_grad for k, p in pl_module.named_parameters()},
            "modes": {k: m.training for k, m in pl_module.named_modules()},
        })


class StepBufferProbe(pl.Callback):
    """BatchNorm buffers right after the training step's forward and at the batch end (after ICS)."""

    def __init__(self) -> None:
        self.pairs: list[tuple[dict, dict]] = []
        self._after_step: dict = {}

    def on_before_backward(self, trainer, pl_module, loss):
        self._after_step = {k: v.detach().clone() for k, v in pl_module.named_buffers()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.pairs.append((self._after_step, {k: v.detach().clone() for k, v in pl_module.named_buffers()}))


@pytest.mark.parametrize("defense", [
    AntiCollapseTripletTraining(eps=0.1, alpha=0.02, steps=3),
    HardnessManipulationTraining(eps=0.1, alpha=0.02, steps=3, ics_weight=0.5),
], ids=["act", "hm_ics"])
def test_crafting_and_ics_leave_batchnorm_statistics_grads_and_modes_alone(defense):
    before, after, step_probe = Probe(), Probe(), StepBufferProbe()
    module = make_ranker(BatchNormNet())
    fit(module, [before, defense, after, step_probe])
    assert len(before.snapshots) == len(after.snapshots) == 4
    for step, (b, a) in enumerate(zip(before.snapshots, after.snapshots)):
        assert "backbone.body.1.running_mean" in b["buffers"]
        for key in b["buffers"]:
            assert torch.equal(b["buffers"][key], a["buffers"][key]), f"step {step}: crafting changed {key}"
        for key, grad in b["grads"].items():
            if step == 0:
                assert a["grads"][key] is None, f"crafting left a .grad on {key}"
            else:
                assert grad is not None and torch.equal(grad, a["grads"][key]), key
        assert a["requires_grad"] == b["requires_grad"] and all(a["requires_grad"].values())
        assert a["modes"] == b["modes"] and all(a["modes"].values())
    for after_step, at_end in step_probe.pairs:  # the ICS forward does not update them either
        for key in after_step:
            assert torch.equal(after_step[key], at_end[key]), key
    assert not torch.equal(after.snapshots[0]["buffers"]["backbone.body.1.running_mean"],
                           before.snapshots[1]["buffers"]["backbone.body.1.running_mean"])


def test_ics_changes_the_update_but_not_the_training_loss():
    with_ics, without = make_ranker(), make_ranker()
    fit(with_ics, [HardnessManipulationTraining(eps=0.1, steps=2, ics_weight=0.5)])
    fit(without, [HardnessManipulationTraining(eps=0.1, steps=2, ics_weight=0.0)])
    assert torch.equal(with_ics.losses[0], without.losses[0])  # same first batch, same crafting
    assert any(not torch.equal(p, q) for p, q in zip(with_ics.state_dict().values(), without.state_dict().values()))


# ----------------------------------------------------------------------------- vanilla equivalence
@pytest.fixture(scope="module")
def vanilla_run():
    module = make_ranker()
    fit(module, [], epochs=2)
    return module


@pytest.mark.parametrize("defense", [
    lambda: AntiCollapseTripletTraining(eps=0.0),
    lambda: HardnessManipulationTraining(eps=0.0, ics_weight=0.5),
    lambda: HardnessManipulationTraining(eps=0.1, warmup_epochs=2),
], ids=["act_eps0", "hm_eps0", "hm_warmup"])
def test_disabled_defense_is_exactly_vanilla_training(defense, vanilla_run):
    module = make_ranker()
    fit(module, [defense()], epochs=2)
    assert len(module.losses) == len(vanilla_run.losses) == 8
    for got, expected in zip(module.losses, vanilla_run.losses):
        assert torch.equal(got, expected)
    for (name, p), q in zip(module.state_dict().items(), vanilla_run.state_dict().values()):
        assert torch.equal(p, q), name


# ----------------------------------------------------------------------------- other families
@pytest.mark.parametrize("defense", [
    AntiCollapseTripletTraining(eps=0.1, steps=2), HardnessManipulationTraining(eps=0.1, steps=2, ics_weight=0.5),
], ids=["act", "hm"])
def test_works_on_a_hashing_ranker(defense):
    torch.manual_seed(0)
    module = DCHRanker(LeNet(embedding_dim=32), DCHLoss(), hash_bits=16)
    trainer, _ = fit(module, [defense])
    m = trainer.callback_metrics
    assert torch.isfinite(m["train/adv_loss_step"]) and torch.isfinite(m["train/loss_step"])


# ----------------------------------------------------------------------------- DDP

DDP_CALLBACKS = {
    "act": ("{class_path: robust_ranking.callbacks.AntiCollapseTripletTraining, init_args: {eps: 0.1, steps: 2}}",
            "train/act_pn_distance_step"),
    "hm_ics": ("{class_path: robust_ranking.callbacks.HardnessManipulationTraining, "
               "init_args: {eps: 0.1, steps: 2, ics_weight: 0.5}}", "train/ics_loss_step"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DDP_CALLBACKS))
def test_two_process_cpu_ddp_fit(name, tmp_path):
    callback, tag = DDP_CALLBACKS[name]
    config = tmp_path / "ddp.yaml"
    config.write_text(defense_ddp_config(tmp_path / "runs", callback))
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
    for key in (tag, "train/adv_loss_step", "train/adv_eps_step"):
        assert key in tags, f"{key} not logged; got {sorted(tags)}"
    assert len(events.Scalars("train/adv_loss_step")) == 2  # 64 images, 2 ranks x 16 per batch -> 2 steps
