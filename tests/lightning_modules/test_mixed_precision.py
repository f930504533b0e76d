"""Mixed precision and ``channels_last``: bf16-mixed training of every ranker family through train.py,
ranks under bf16 autocast of the backbone vs float32 (stated tolerances), the attacks' float32
gradients and ranks under eval.py's autocast wrapper, and the ResNet backbones' ``channels_last`` option.

Tolerances (measured on the tests' tiny LeNet ranker, |X| = 100, and a random-init ResNet-18 on 64
images; docs/scale.md, "Mixed precision"): bf16 autocast changes embeddings by ~5e-3; per query the
top-10 sets overlap >= 0.96 on average (min 0.8), the whole rankings have Spearman correlation
>= 0.996 (min 0.992), the top-1 neighbour agrees for >= 95% of the queries, and the CA+ rank of a
5-step attack moves by < 0.5 percentage points. The asserted bounds leave margin below these.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import TripletMarginLoss

from robust_ranking.attacks import CandidateAttack, Gallery
from robust_ranking.cli import train
from robust_ranking.evaluation.benchmark import _autocast_model
from robust_ranking.lightning_modules import MetricRanker, ResNet18, ResNet50
from run_helpers import REPO

# The asserted bounds (see the module docstring for the measured values).
MIN_MEAN_TOP10_OVERLAP = 0.9
MIN_TOP10_OVERLAP = 0.6
MIN_MEAN_SPEARMAN = 0.99
MIN_SPEARMAN = 0.97
MIN_TOP1_AGREEMENT = 0.85
MAX_CA_RANK_SHIFT = 3.0  # percentage points of the normalized rank

TINY = [
    "--data", "robust_ranking.data.SyntheticDataModule",
    "--data.batch_size", "16", "--data.samples_per_class", "4", "--data.eval_batch_size", "64",
    "--model.init_args.backbone.init_args.embedding_dim", "16",
    "--trainer.accelerator", "cpu", "--trainer.fast_dev_run", "1",
]


def bf16_wrapped(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose embed / encode / forward run as under ``eval.py --precision bf16-mixed``
    (the same wrapper, :func:`evaluation.benchmark._autocast_model`, with Lightning's bf16 CPU plugin)."""
    model = copy.deepcopy(model)
    trainer = SimpleNamespace(strategy=SimpleNamespace(precision_plugin=MixedPrecision("bf16-mixed", "cpu")))
    _autocast_model(model, trainer)
    return model


def images_and_labels(tiny_ranker) -> tuple[torch.Tensor, torch.Tensor]:
    data = tiny_ranker.datamodule.eval_set
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([int(data[i][1]) for i in range(len(data))])
    return x, y


def rank_agreement(d32: torch.Tensor, d16: torch.Tensor, k: int = 10) -> dict[str, torch.Tensor]:
    """Per query: top-``k`` overlap, Spearman correlation of the whole rankings, same top-1."""
    n = d32.shape[1]
    t32, t16 = d32.topk(k, largest=False).indices, d16.topk(k, largest=False).indices
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(t32, t16)])
    r32 = torch.sort(d32, dim=1, stable=True).indices.argsort(1).double()
    r16 = torch.sort(d16, dim=1, stable=True).indices.argsort(1).double()
    spearman = 1 - 6 * ((r32 - r16) ** 2).sum(1) / (n * (n * n - 1))
    return {"overlap": overlap, "spearman": spearman, "top1": (t32[:, 0] == t16[:, 0]).double()}


def assert_ranks_close(model32: MetricRanker, x: torch.Tensor) -> None:
    model16 = bf16_wrapped(model32)
    with torch.no_grad():
        e32, e16 = model32.embed(x), model16.embed(x)
    assert e16.dtype == torch.float32  # the wrapper hands float32 to attacks / retrieval
    assert not torch.equal(e32, e16)  # the backbone really ran in bf16
    d32 = model32.distance(e32, e32).fill_diagonal_(float("inf"))  # self excluded, as the metrics do
    d16 = model32.distance(e16, e16).fill_diagonal_(float("inf"))
    agree = rank_agreement(d32, d16)
    assert agree["overlap"].mean() >= MIN_MEAN_TOP10_OVERLAP and agree["overlap"].min() >= MIN_TOP10_OVERLAP
    assert agree["spearman"].mean() >= MIN_MEAN_SPEARMAN and agree["spearman"].min() >= MIN_SPEARMAN
    assert agree["top1"].mean() >= MIN_TOP1_AGREEMENT


# ------------------------------------------------------------------------------------ bf16 training
@pytest.mark.parametrize("family", ["ct", "dpqn", "dch"])  # MetricRanker, DPQNRanker, DCHRanker
def test_bf16_mixed_training_every_family(family: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = train.main(["fit", "--config", str(REPO / "configs" / "models" / f"{family}.yaml"), *TINY,
                      "--trainer.precision", "bf16-mixed"])
    assert cli.trainer.precision == "bf16-mixed"
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss_step"])
    assert "val/map" in metrics and torch.isfinite(metrics["val/map"])
    # The validation gallery was ranked in float32 (half-precision codes are stored as float32).
    for state in (cli.model.val_metrics,):
        assert all(c.dtype != torch.bfloat16 for c in state.codes)


def test_bf16_mixed_training_resnet18_channels_last(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = train.main(["fit", "--config", str(REPO / "configs" / "models" / "ct_resnet18.yaml"), *TINY,
                      "--model.init_args.backbone.init_args.channels_last", "true",
                      "--trainer.precision", "bf16-mixed"])
    assert torch.isfinite(cli.trainer.callback_metrics["val/map"])
    conv = cli.model.backbone.net.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and conv.dtype == torch.float32


# ------------------------------------------------------------------ ranks under bf16 autocast
def test_bf16_autocast_ranks_match_fp32_tiny_ranker(tiny_ranker) -> None:
    x, _ = images_and_labels(tiny_ranker)
    assert_ranks_close(tiny_ranker.model, x)


def test_bf16_autocast_ranks_match_fp32_resnet18() -> None:
    torch.manual_seed(0)
    model = MetricRanker(ResNet18(embedding_dim=16), TripletMarginLoss(distance=CosineSimilarity())).eval()
    x = torch.rand(48, 1, 28, 28)
    assert_ranks_close(model, x)


def test_attack_under_bf16_autocast_is_float32_and_close(tiny_ranker) -> None:
    """Under eval.py's bf16 wrapper only the model's forwards run in bf16: the attack loss, its gradient
    w.r.t. the images, the PGD step and the ranks are float32, and CA+ ranks match the float32 attack's."""
    x, y = images_and_labels(tiny_ranker)
    idx = torch.arange(0, 100, 5)
    results = {}
    for name, model in (("fp32", tiny_ranker.model), ("bf16", bf16_wrapped(tiny_ranker.model))):
        with torch.no_grad():
            gallery = Gallery(model.embed(x), y)
        assert gallery.embeddings.dtype == torch.float32
        results[name] = CandidateAttack("+", 1, eps=0.1, steps=5)(model, gallery, x[idx], idx)
    r32, r16 = results["fp32"], results["bf16"]
    assert r16.adversarial.dtype == torch.float32 and r16.metrics["rank"].dtype == torch.float32
    assert (r16.perturbation.abs() <= 0.1 + 1e-6).all()
    assert torch.equal(r16.targets, r32.targets)  # target selection from float32 distances: same targets
    assert abs(float(r16.metrics["rank"].mean() - r32.metrics["rank"].mean())) <= MAX_CA_RANK_SHIFT
    assert r16.metrics["rank"].mean() < r16.metrics["rank_clean"].mean() - 5  # the attack still works


def test_input_gradient_is_float32_under_bf16(tiny_ranker) -> None:
    model = bf16_wrapped(tiny_ranker.model)
    x, _ = images_and_labels(tiny_ranker)
    x = x[:8].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.embed(x).sum(), x)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- channels_last
@pytest.mark.parametrize("arch,kwargs,shape", [
    (ResNet18, {"embedding_dim": 16}, (4, 1, 28, 28)),
    (ResNet50, {"embedding_dim": 16, "small_input": True}, (2, 3, 32, 32)),
])
def test_channels_last_same_numbers(arch, kwargs, shape) -> None:
    torch.manual_seed(0)
    plain = arch(**kwargs).eval()
    fast = arch(**kwargs, channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())  # same keys and shapes: checkpoints load either way
    assert set(fast.state_dict()) == set(plain.state_dict())
    weights = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)  # layout kept by the load
    x = torch.rand(*shape)
    xp, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_p, out_f = plain(xp), fast(xf)
    torch.testing.assert_close(out_f, out_p, atol=1e-4, rtol=1e-4)
    (gp,) = torch.autograd.grad(out_p.sum(), xp)
    (gf,) = torch.autograd.grad(out_f.sum(), xf)
    assert gf.shape == x.shape
    torch.testing.assert_close(gf, gp, atol=1e-4, rtol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = fast(x)
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.float(), out_p.detach(), atol=0.1, rtol=0.1)


def test_channels_last_in_a_ranker_with_attack(tiny_ranker) -> None:
    torch.manual_seed(0)
    plain = MetricRanker(ResNet18(embedding_dim=16), TripletMarginLoss(distance=CosineSimilarity())).eval()
    fast = MetricRanker(ResNet18(embedding_dim=16, channels_last=True),
                        TripletMarginLoss(distance=CosineSimilarity())).eval()
    fast.load_state_dict(plain.state_dict())
    x, y = images_and_labels(tiny_ranker)
    x, y = x[:40], y[:40]
    idx = torch.arange(0, 40, 4)
    ranks = []
    for model in (plain, fast):
        with torch.no_grad():
            gallery = Gallery(model.embed(x), y)
        result = CandidateAttack("+", 1, eps=0.05, steps=2)(model, gallery, x[idx], idx)
        assert result.adversarial.is_contiguous()  # the images keep the default layout
        ranks.append(result.metrics["rank"])
    torch.testing.assert_close(ranks[1], ranks[0], atol=5.0, rtol=0)
