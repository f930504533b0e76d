"""Universal perturbations: I-CA/I-QA (ECCV 2020 Eq. 14, Table 6) and UAP-IR (label / pair / list-wise)."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import TripletMarginLoss
from torch import nn

from robust_ranking.attacks import CandidateAttack, Gallery, QueryAttack
from robust_ranking.attacks.gallery import QuerySet
from robust_ranking.attacks.universal.uap_retrieval import UAPRetrieval, resize_perturbation, retrieval_metrics
from robust_ranking.attacks.universal.universal_ranking_attack import UniversalRankingAttack, fit_unseen_split
from robust_ranking.lightning_modules import MetricRanker
from robust_ranking.retrieval.topk_metrics import map_at_topk

EPS = 0.1


@pytest.fixture(scope="module")
def setup(tiny_ranker):
    ds = tiny_ranker.datamodule.eval_set
    x, y = ds.images.float() / 255.0, ds.labels
    with torch.no_grad():
        gallery = Gallery(tiny_ranker.model.embed(x), y)
    fit, unseen = fit_unseen_split(len(y), fraction=0.2, seed=0)
    return tiny_ranker.model, gallery, x, y, fit, unseen


def pooling_ranker() -> MetricRanker:
    """A ranker that accepts any input size (global pooling), for the resizing path."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                             nn.Linear(128, 16))
    return MetricRanker(backbone, TripletMarginLoss(margin=0.2, distance=CosineSimilarity())).eval()


# ----------------------------------------------------------------------------- I-CA / I-QA
def test_fit_unseen_split_is_disjoint_five_percent():
    fit, unseen = fit_unseen_split(1000)
    assert len(fit) == len(unseen) == 50
    assert not set(fit.tolist()) & set(unseen.tolist())
    assert torch.equal(fit, fit_unseen_split(1000)[0])  # seeded
    with pytest.raises(ValueError, match="fraction"):
        fit_unseen_split(100, fraction=0.0)


@pytest.mark.parametrize("kind", ["CA", "QA"])
def test_one_perturbation_shared_by_all_samples_within_eps_and_box(setup, kind):
    model, gallery, x, _, fit, unseen = setup
    attack = UniversalRankingAttack(kind, "-", eps=EPS, epochs=2, batch_size=8)
    result = attack(model, gallery, QuerySet(x[fit], fit), QuerySet(x[unseen], unseen))
    r = result.perturbation
    assert r.shape == x.shape[1:]
    assert float(r.abs().max()) <= EPS + 1e-6 and float(r.abs().max()) > 0
    adv = attack.evaluate(model, gallery, x[unseen], unseen, r).adversarial
    assert torch.allclose(adv, (x[unseen] + r).clamp(0, 1))  # the same r for every sample, clipped to the box
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    assert float((adv - x[unseen]).abs().max()) <= EPS + 1e-6
    assert len(result.history) == 2


@pytest.mark.parametrize("kind", ["CA", "QA"])
def test_universal_minus_attacks_lower_the_rank_on_fit_and_unseen(setup, kind):
    model, gallery, x, _, fit, unseen = setup
    result = UniversalRankingAttack(kind, "-", eps=EPS, epochs=4)(model, gallery, QuerySet(x[fit], fit),
                                                                 QuerySet(x[unseen], unseen))
    s = result.summary()
    assert s["fit/rank"] > s["fit/rank_clean"] + 5
    assert s["unseen/rank"] > s["unseen/rank_clean"] + 5  # generalizes to images not used in the fit
    assert result.history[-1] > result.history[0]  # effect curve over epochs


def test_targets_are_those_of_the_per_sample_attacks(setup):
    """Targets are keyed by sample index: the same Q / C as CA / QA draw, whatever the batching."""
    model, gallery, x, _, fit, _ = setup
    ica = UniversalRankingAttack("CA", "+", 2, eps=EPS, epochs=1, batch_size=7, seed=3)
    res = ica(model, gallery, QuerySet(x[fit], fit))
    assert torch.equal(res.fit_targets, CandidateAttack("+", 2, eps=EPS, seed=3).select_queries(gallery, model, fit))
    iqa = UniversalRankingAttack("QA", "-", eps=EPS, epochs=1, seed=3)
    res = iqa(model, gallery, QuerySet(x[fit], fit))
    assert torch.equal(res.fit_targets, QueryAttack("-", eps=EPS, seed=3, G=0).select_targets(gallery, model, fit)[0])


def test_zero_perturbation_reproduces_clean_ranks(setup):
    model, gallery, x, _, fit, _ = setup
    attack = UniversalRankingAttack("QA", "+", eps=EPS)
    out = attack.evaluate(model, gallery, x[fit], fit, torch.zeros(x.shape[1:]))
    assert torch.equal(out.metrics["rank"], out.metrics["rank_clean"])


def test_universal_errors_are_one_line(setup):
    model, gallery, x, _, fit, _ = setup
    for kwargs, match in [(dict(kind="XA"), "kind"), (dict(momentum=1.0), "momentum"), (dict(epochs=0), "epochs"),
                          (dict(direction="*"), "direction")]:
        args = {"kind": "CA", "direction": "+", "eps": EPS, **kwargs}
        with pytest.raises(ValueError, match=match):
            UniversalRankingAttack(**args)
    attack = UniversalRankingAttack("CA", "+", eps=EPS, epochs=1)
    with pytest.raises(ValueError, match="disjoint"):
        attack(model, gallery, QuerySet(x[fit], fit), QuerySet(x[fit], fit))
    with pytest.raises(ValueError, match="exceeds eps"):
        attack.evaluate(model, gallery, x[fit], fit, torch.full(x.shape[1:], 0.5))


def test_tensorboard_logs_perturbation_image_and_effect_curve(setup, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model, gallery, x, y, fit, _ = setup
    writer = SummaryWriter(str(tmp_path))
    UniversalRankingAttack("CA", "-", eps=EPS, epochs=3)(model, gallery, QuerySet(x[fit], fit), logger=writer)
    UAPRetrieval("pair", eps=EPS, epochs=2)(model, gallery, QuerySet(x[fit], fit, y[fit]), logger=writer)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert len(events.Scalars("universal/I-CA-/fit_rank")) == 3
    assert len(events.Scalars("universal/UAP-IR/pair/fit_loss")) == 2
    assert {"universal/I-CA-/perturbation", "universal/UAP-IR/pair/perturbation"} <= set(events.Tags()["images"])


# ---------------------------------------------------------------------------------- UAP-IR
@pytest.mark.parametrize("size", [(28, 28), (14, 14), (21, 35), (56, 40), (1, 1), (7, 28)])
def test_resize_perturbation_produces_each_input_size(size):
    r = (torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1) * EPS
    out = resize_perturbation(r, size, eps=EPS)
    assert out.shape == (1, *size)
    assert float(out.abs().max()) <= EPS + 1e-7
    assert float(resize_perturbation(r, size, eps=EPS / 2).abs().max()) <= EPS / 2 + 1e-7
    if size == (28, 28):
        assert torch.equal(out, r)


def test_resize_perturbation_is_differentiable_and_validates():
    r = torch.zeros(3, 8, 8, requires_grad=True)
    resize_perturbation(r, (16, 12)).sum().backward()
    assert r.grad is not None and r.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="C, H, W"):
        resize_perturbation(torch.zeros(8, 8), (4, 4))


def test_retrieval_metrics_match_topk_metrics_without_self(setup):
    model, gallery, x, y, fit, _ = setup
    ours = retrieval_metrics(model, gallery, gallery.embeddings[fit], y[fit], sample_indices=fit)
    keep = torch.ones(len(y), dtype=torch.bool)
    for i in fit.tolist():  # reference: one query at a time with its own entry removed
        keep[:] = True
        keep[i] = False
        d = model.distance(gallery.embeddings[i : i + 1], gallery.embeddings[keep])
        ref = map_at_topk(d, y[i : i + 1], y[keep])
        assert math.isclose(float(ours["ap"][fit.tolist().index(i)]), ref, rel_tol=1e-6)


@pytest.mark.parametrize("objective", ["label", "pair", "list"])
def test_uap_objectives_decrease_and_hurt_retrieval(setup, objective):
    model, gallery, x, y, fit, unseen = setup
    attack = UAPRetrieval(objective, eps=0.3, step=0.03, epochs=5, batch_size=10)
    res = attack(model, gallery, QuerySet(x[fit], fit, y[fit]), QuerySet(x[unseen], unseen, y[unseen]))
    assert res.history[-1] < res.history[0]
    assert float(res.perturbation.abs().max()) <= 0.3 + 1e-6
    for split in (res.fit, res.unseen):
        assert set(split) == {"mAP_clean", "mAP", "mP@10_clean", "mP@10", "mDR"}
        assert split["mAP"] <= split["mAP_clean"] + 1e-6
        assert math.isclose(split["mDR"], (split["mAP_clean"] - split["mAP"]) / split["mAP_clean"])
        assert split["mDR"] > 0.2  # fit and unseen queries alike


@pytest.mark.parametrize("resize_range", [(0.5, 1.0), (1.0, 2.0)])
def test_uap_random_resizing_fits_one_perturbation_for_every_size(resize_range):
    model = pooling_ranker()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 1, 28, 28, generator=g), torch.arange(40) % 4
    with torch.no_grad():
        gallery = Gallery(model.embed(x), y)
    attack = UAPRetrieval("pair", eps=EPS, epochs=2, batch_size=8, resize_range=resize_range)
    r, history = attack.fit(model, gallery, x[:20], y[:20])
    assert r.shape == (1, 28, 28) and len(history) == 2
    assert float(r.abs().max()) <= EPS + 1e-6
    for scale in (0.5, 1.0, 1.5):  # queries of other sizes get r resized to their size
        out = attack.evaluate(model, gallery, x[20:], y[20:], r, sample_indices=torch.arange(20, 40), scale=scale)
        assert all(math.isfinite(v) for v in out.values())


def test_uap_errors_are_one_line():
    for kwargs, match in [(dict(objective="rank"), "objective"), (dict(resize_range=(2.0, 1.0)), "resize_range"),
                          (dict(tau=0.0), "tau"), (dict(num_clusters=1), "num_clusters")]:
        args = {"objective": "pair", "eps": EPS, **kwargs}
        with pytest.raises(ValueError, match=match):
            UAPRetrieval(**args)


def test_fixed_input_model_with_random_resizing_through_input_size(setup):
    """LeNet takes only 28x28: with input_size every resized query is resized back before the model."""
    model, gallery, x, y, fit, unseen = setup
    seen_sizes: list[tuple[int, int]] = []
    original = UAPRetrieval._forward

    def spy(self, m, images):
        seen_sizes.append(tuple(images.shape[-2:]))
        return original(self, m, images)

    attack = UAPRetrieval("list", eps=EPS, epochs=2, batch_size=10, resize_range=(0.5, 1.5), input_size=28)
    UAPRetrieval._forward = spy  # type: ignore[method-assign]
    try:
        r, _ = attack.fit(model, gallery, x[fit], y[fit])
        out = attack.evaluate(model, gallery, x[unseen], y[unseen], r, sample_indices=unseen, scale=0.5)
    finally:
        UAPRetrieval._forward = original  # type: ignore[method-assign]
    assert len(set(seen_sizes)) > 1, "queries of several sizes reach the attack"
    assert r.shape == (1, 28, 28) and float(r.abs().max()) <= EPS + 1e-6
    assert all(math.isfinite(v) for v in out.values())
    without = UAPRetrieval("list", eps=EPS, epochs=1, batch_size=10, resize_range=(0.5, 0.5))
    with pytest.raises(RuntimeError):  # the fc layer of LeNet refuses 14x14 inputs
        without.fit(model, gallery, x[fit], y[fit])
    with pytest.raises(ValueError, match="input_size"):
        UAPRetrieval("list", eps=EPS, input_size=(28, 0))


def test_one_schedule_validation_for_every_universal_attack():
    from robust_ranking.attacks.universal.universal_ranking_attack import check_schedule

    assert check_schedule(0.3, 10, 64, None, 0.9) == (10, 64, 0.01, 0.9)  # ECCV alpha rule for eps 0.3
    for kwargs, match in [(dict(epochs=0), "epochs"), (dict(batch_size=0), "batch_size"), (dict(step=0.0), "step"),
                          (dict(momentum=1.0), "momentum"), (dict(eps=2.0), "eps")]:
        args = {"eps": 0.1, **kwargs}
        with pytest.raises(ValueError, match=match):
            UniversalRankingAttack("CA", "+", **args)
        with pytest.raises(ValueError, match=match):
            UAPRetrieval("pair", **args)


def test_fit_unseen_split_by_size():
    fit, unseen = fit_unseen_split(100, size=30, seed=1)
    assert len(fit) == len(unseen) == 30 and not set(fit.tolist()) & set(unseen.tolist())
    with pytest.raises(ValueError, match="cannot hold"):
        fit_unseen_split(100, size=51)


def test_pair_negative_cluster_choice(setup):
    model, gallery, x, y, fit, _ = setup
    losses = {}
    for negative in ("farthest", "nearest"):
        attack = UAPRetrieval("pair", eps=EPS, epochs=1, batch_size=10, negative=negative)
        loss_fn = attack._loss_factory(model, gallery)
        with torch.no_grad():
            f = model.embed(x[fit])
        losses[negative] = loss_fn(f, f, y[fit])
    # clean features: [d(f, c_n) - d(f, c_p) + margin]_+ is larger for the farthest negative
    assert bool((losses["farthest"] >= losses["nearest"]).all())
    assert UAPRetrieval("pair", eps=EPS, negative="nearest").hparams["negative"] == "nearest"
    with pytest.raises(ValueError, match="negative"):
        UAPRetrieval("pair", eps=EPS, negative="random")


@pytest.mark.parametrize("kind", ["CA", "QA"])
def test_shared_targets_are_one_set_outside_the_attacked_samples(setup, kind):
    model, gallery, x, _, fit, unseen = setup
    attack = UniversalRankingAttack(kind, "+", 1, eps=0.3, epochs=2, batch_size=10, shared_targets=True)
    res = attack(model, gallery, QuerySet(x[fit], fit), QuerySet(x[unseen], unseen))
    for targets in (res.fit_targets, res.unseen_targets):
        assert bool((targets == targets[0]).all()), "every sample shares the one target set"
    assert not set(res.fit_targets[0].tolist()) & (set(fit.tolist()) | set(unseen.tolist()))
    assert res.summary()["fit/rank"] < res.summary()["fit/rank_clean"]
    with pytest.raises(ValueError, match="shared_targets needs a '\\+' attack"):
        UniversalRankingAttack(kind, "-", 1, eps=0.3, shared_targets=True)
