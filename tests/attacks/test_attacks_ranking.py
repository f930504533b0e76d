"""ECCV 2020 ranking attacks (CA+/CA-/QA+/QA-/ES) on a tiny trained ranker."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robust_ranking.attacks import CandidateAttack, Gallery, MaxShiftAttack, QueryAttack, embedding_shift, max_shift_perturb


class ToyRanker(nn.Module):
    """Follows the ranker contract: ``embed`` (L2-normalized) and a broadcasting ``distance``."""

    def __init__(self, metric: str = "cosine") -> None:
        super().__init__()
        self.metric = metric
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
            nn.Linear(8 * 8 * 8, 16),
        )

    def embed(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=-1)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        if self.metric == "cosine":
            return 1.0 - a @ b.transpose(-1, -2)
        return torch.cdist(a, b)


def _make_data(templates: Tensor, n_per_class: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    y = torch.arange(templates.shape[0]).repeat_interleave(n_per_class)
    x = (templates[y] + 0.25 * torch.randn(len(y), 1, 8, 8, generator=g)).clamp(0.0, 1.0)
    return x, y


def _train(metric: str) -> tuple[ToyRanker, Tensor, Tensor, Gallery]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    templates = torch.rand(4, 1, 8, 8, generator=g)
    x_train, y_train = _make_data(templates, 100, g)
    x_gal, y_gal = _make_data(templates, 50, g)  # X: 200 images, 4 classes
    model = ToyRanker(metric)
    proxies = nn.Parameter(torch.randn(4, 16))
    opt = torch.optim.Adam([*model.parameters(), proxies], lr=1e-2)
    for _ in range(120):  # normalized-softmax proxy training: a few hundred ms
        idx = torch.randint(0, len(y_train), (64,), generator=g)
        logits = 10.0 * model.embed(x_train[idx]) @ F.normalize(proxies, dim=-1).T
        opt.zero_grad()
        F.cross_entropy(logits, y_train[idx]).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    with torch.no_grad():
        gallery = Gallery(model.embed(x_gal), y_gal)
    return model, x_gal, y_gal, gallery


@pytest.fixture(scope="module")
def cosine_setup() -> tuple[ToyRanker, Tensor, Tensor, Gallery]:
    return _train("cosine")


@pytest.fixture(scope="module")
def euclid_setup() -> tuple[ToyRanker, Tensor, Tensor, Gallery]:
    return _train("euclidean")


ATTACKED = torch.arange(0, 200, 5)  # 40 attacked samples, 10 per class


def _all_attacks(eps: float, random_start: bool = False) -> list:
    return [
        CandidateAttack("+", 2, eps=eps, random_start=random_start),
        CandidateAttack("-", 2, eps=eps, random_start=random_start),
        QueryAttack("+", 2, eps=eps, random_start=random_start),
        QueryAttack("-", 1, eps=eps, random_start=random_start),
        MaxShiftAttack(eps, random_start=random_start),
    ]


def test_toy_model_is_a_meaningful_ranker(cosine_setup) -> None:
    model, x, y, gallery = cosine_setup
    d = model.distance(gallery.embeddings, gallery.embeddings).fill_diagonal_(math.inf)
    assert (y[d.argmin(1)] == y).float().mean() > 0.95


@pytest.mark.parametrize("setup", ["cosine_setup", "euclid_setup"])
def test_attacks_move_ranks_in_their_direction(setup: str, request: pytest.FixtureRequest) -> None:
    model, x, _, gallery = request.getfixturevalue(setup)
    eps, idx = 0.1, ATTACKED
    ca_plus = CandidateAttack("+", 1, eps=eps)(model, gallery, x[idx], idx).metrics
    ca_minus = CandidateAttack("-", 1, eps=eps)(model, gallery, x[idx], idx).metrics
    qa_plus = QueryAttack("+", 1, eps=eps)(model, gallery, x[idx], idx).metrics
    qa_minus = QueryAttack("-", 1, eps=eps, xi=1.0)(model, gallery, x[idx], idx).metrics
    # Clean: random targets average near 50%, top-1% targets near 0% (Sec. 4).
    assert 35 < ca_plus["rank_clean"].mean() < 65 and 35 < qa_plus["rank_clean"].mean() < 65
    assert ca_minus["rank_clean"].mean() < 3 and qa_minus["rank_clean"].mean() < 3
    assert ca_plus["rank"].mean() < ca_plus["rank_clean"].mean() - 10
    assert qa_plus["rank"].mean() < qa_plus["rank_clean"].mean() - 5
    assert ca_minus["rank"].mean() > ca_minus["rank_clean"].mean() + 10
    assert qa_minus["rank"].mean() > qa_minus["rank_clean"].mean() + 0.5
    # Stronger budget, stronger effect.
    ca_plus_strong = CandidateAttack("+", 1, eps=0.3)(model, gallery, x[idx], idx).metrics
    assert ca_plus_strong["rank"].mean() < ca_plus["rank"].mean()


@pytest.mark.parametrize("setup", ["cosine_setup", "euclid_setup"])
def test_max_shift_beats_random_noise(setup: str, request: pytest.FixtureRequest) -> None:
    model, x, _, gallery = request.getfixturevalue(setup)
    eps, idx = 0.1, ATTACKED
    result = MaxShiftAttack(eps)(model, gallery, x[idx], idx)
    shift = result.metrics["shift"]
    assert shift.shape == (len(idx),) and torch.all(shift > 0)
    g = torch.Generator().manual_seed(1)
    noise = (x[idx] + eps * torch.randint(0, 2, x[idx].shape, generator=g).mul(2).sub(1)).clamp(0, 1)
    with torch.no_grad():
        clean = model.embed(x[idx])
        noise_shift = embedding_shift(model, noise, clean)
        torch.testing.assert_close(embedding_shift(model, result.adversarial, clean), shift)
    assert shift.mean() > 2 * noise_shift.mean()
    assert result.targets is None


def test_max_shift_perturb_matches_attack_direction(cosine_setup) -> None:
    model, x, _, _ = cosine_setup
    g = torch.Generator().manual_seed(0)
    x_adv = max_shift_perturb(model, x[:16], 0.1, 0.01, 20, generator=g)
    assert (x_adv - x[:16]).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        shift = embedding_shift(model, x_adv, model.embed(x[:16]))
    assert torch.all(shift > 0)
    x_rs = max_shift_perturb(model, x[:16], torch.full((16,), 0.05), 0.01, 10, random_start=True, generator=g)
    assert (x_rs - x[:16]).abs().amax(dim=(1, 2, 3)).max() <= 0.05 + 1e-6


def test_eps_zero_changes_nothing(cosine_setup) -> None:
    model, x, _, gallery = cosine_setup
    idx = ATTACKED[:12]
    for attack in _all_attacks(0.0, random_start=True):
        result = attack(model, gallery, x[idx], idx)
        assert torch.equal(result.adversarial, x[idx]), attack
        assert torch.equal(result.perturbation, torch.zeros_like(x[idx]))
        if "rank" in result.metrics:
            assert torch.equal(result.metrics["rank"], result.metrics["rank_clean"])
        if "sp_rank" in result.metrics:
            assert torch.equal(result.metrics["sp_rank"], result.metrics["sp_rank_clean"])
        if "shift" in result.metrics:
            # d(f(x), f(x)) itself: 0 up to the model's own round-off (cosine: 1 - a.a).
            torch.testing.assert_close(result.metrics["shift"], torch.zeros(len(idx)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("random_start", [False, True])
@pytest.mark.parametrize("eps", [0.03, 0.3])
def test_perturbations_stay_in_ball_and_box(cosine_setup, eps: float, random_start: bool) -> None:
    model, x, _, gallery = cosine_setup
    idx = ATTACKED[:12]
    for attack in _all_attacks(eps, random_start):
        result = attack(model, gallery, x[idx], idx)
        assert result.perturbation.abs().max() <= eps + 1e-6, attack
        assert result.adversarial.min() >= 0.0 and result.adversarial.max() <= 1.0
        torch.testing.assert_close(result.adversarial - x[idx], result.perturbation)
        for value in result.metrics.values():
            assert value.shape == (len(idx),)


@pytest.mark.parametrize("random_start", [False, True])
def test_results_do_not_depend_on_batching(cosine_setup, random_start: bool) -> None:
    model, x, _, gallery = cosine_setup
    samples = [3, 7, 9]
    for attack in _all_attacks(0.1, random_start):
        together = attack(model, gallery, x[samples], torch.tensor(samples))
        reversed_ = attack(model, gallery, x[samples[::-1]], torch.tensor(samples[::-1]))
        for pos, s in enumerate(samples):
            alone = attack(model, gallery, x[[s]], torch.tensor([s]))
            for res, i in ((alone, 0), (reversed_, len(samples) - 1 - pos)):
                if together.targets is not None:
                    assert torch.equal(res.targets[i], together.targets[pos]), attack
                if together.sp_targets is not None:
                    assert torch.equal(res.sp_targets[i], together.sp_targets[pos])
                torch.testing.assert_close(res.adversarial[i], together.adversarial[pos], atol=1e-5, rtol=0)
                for key, value in together.metrics.items():
                    torch.testing.assert_close(res.metrics[key][i], value[pos], atol=1e-5, rtol=1e-5)


def test_target_streams_differ_between_attack_kinds(cosine_setup) -> None:
    model, x, _, gallery = cosine_setup
    idx = ATTACKED
    ca = CandidateAttack("+", 2, eps=0.01, steps=1)(model, gallery, x[idx], idx).targets
    qa = QueryAttack("+", 2, eps=0.01, steps=1)(model, gallery, x[idx], idx).targets
    assert not torch.equal(ca, qa)
    assert not (ca == idx[:, None]).any() and not (qa == idx[:, None]).any()
    ca_seed = CandidateAttack("+", 2, eps=0.01, steps=1, seed=1)(model, gallery, x[idx], idx).targets
    assert not torch.equal(ca, ca_seed)


def test_minus_attacks_draw_from_the_top_percent(cosine_setup) -> None:
    model, x, _, gallery = cosine_setup
    idx = ATTACKED
    n = len(gallery)
    pool = math.ceil(0.01 * n)  # 2 of 200
    d = model.distance(gallery.embeddings[idx], gallery.embeddings)
    d[torch.arange(len(idx)), idx] = math.inf
    top = torch.sort(d, dim=1, stable=True).indices[:, :pool]
    for attack in (CandidateAttack("-", 1, eps=0.01, steps=1), QueryAttack("-", 2, eps=0.01, steps=1)):
        targets = attack(model, gallery, x[idx], idx).targets
        assert (targets[:, :, None] == top[:, None, :]).any(-1).all()


def _brute_rank(
    model: ToyRanker, q_emb: Tensor, c_emb: Tensor, gallery: Gallery, excluded: set[int]
) -> float:
    """Normalized rank by a plain python loop over the gallery."""
    d_qc = model.distance(q_emb[None], c_emb[None])[0, 0].item()
    count = 0
    for j in range(len(gallery)):
        if j in excluded:
            continue
        if model.distance(q_emb[None], gallery.embeddings[j][None])[0, 0].item() < d_qc:
            count += 1
    return 100.0 * count / len(gallery)


@pytest.mark.parametrize("direction", ["+", "-"])
def test_query_attack_metrics_match_brute_force(cosine_setup, direction: str) -> None:
    model, x, _, gallery = cosine_setup
    idx = torch.tensor([0, 61, 122, 199])
    attack = QueryAttack(direction, 2, eps=0.05, G=3)
    result = attack(model, gallery, x[idx], idx)
    with torch.no_grad():
        for b, q in enumerate(idx.tolist()):
            assert q not in result.targets[b].tolist() and q not in result.sp_targets[b].tolist()
            assert not set(result.targets[b].tolist()) & set(result.sp_targets[b].tolist())
            for key, image in (("", result.adversarial[b]), ("_clean", x[q])):
                q_emb = model.embed(image[None])[0]
                ranks = [_brute_rank(model, q_emb, gallery.embeddings[c], gallery, {q, c})
                         for c in result.targets[b].tolist()]
                sp_ranks = [_brute_rank(model, q_emb, gallery.embeddings[c], gallery, {q, c})
                            for c in result.sp_targets[b].tolist()]
                assert result.metrics[f"rank{key}"][b].item() == pytest.approx(sum(ranks) / 2, abs=1e-4)
                assert result.metrics[f"sp_rank{key}"][b].item() == pytest.approx(sum(sp_ranks) / 3, abs=1e-4)
            # C_SP: the G nearest (clean) among X \ (C ∪ {q}).
            d = [(model.distance(gallery.embeddings[q][None], gallery.embeddings[j][None]).item(), j)
                 for j in range(len(gallery)) if j != q and j not in result.targets[b].tolist()]
            assert set(result.sp_targets[b].tolist()) == {j for _, j in sorted(d)[:3]}


def test_candidate_attack_metrics_match_brute_force(cosine_setup) -> None:
    model, x, _, gallery = cosine_setup
    idx = torch.tensor([5, 77, 150])
    result = CandidateAttack("+", 3, eps=0.05)(model, gallery, x[idx], idx)
    with torch.no_grad():
        for b, c in enumerate(idx.tolist()):
            for key, image in (("", result.adversarial[b]), ("_clean", x[c])):
                c_emb = model.embed(image[None])[0]
                ranks = [_brute_rank(model, gallery.embeddings[q], c_emb, gallery, {q, c})
                         for q in result.targets[b].tolist()]
                assert result.metrics[f"rank{key}"][b].item() == pytest.approx(sum(ranks) / 3, abs=1e-4)


def test_semantics_preserving_term_keeps_sp_rank(cosine_setup) -> None:
    model, x, _, gallery = cosine_setup
    idx = ATTACKED
    free = QueryAttack("-", 1, eps=0.3, xi=0.0)(model, gallery, x[idx], idx).metrics
    kept = QueryAttack("-", 1, eps=0.3, xi=1e4)(model, gallery, x[idx], idx).metrics
    torch.testing.assert_close(kept["sp_rank_clean"], free["sp_rank_clean"])
    assert kept["sp_rank"].mean() <= kept["sp_rank_clean"].mean() + 1.0  # within 1 point of clean
    assert free["sp_rank"].mean() > kept["sp_rank"].mean()
    assert free["rank"].mean() > kept["rank_clean"].mean()


def test_sp_rank_is_nan_without_sp_set(cosine_setup) -> None:
    model, x, _, gallery = cosine_setup
    result = QueryAttack("+", 1, eps=0.03, G=0)(model, gallery, x[:4], torch.arange(4))
    assert torch.isnan(result.metrics["sp_rank"]).all() and result.sp_targets.shape == (4, 0)
    assert not torch.isnan(result.metrics["rank"]).any()


def test_query_attack_reduction_weighs_the_sp_term_per_candidate(cosine_setup) -> None:
    """With "sum" the attack term grows with m against a fixed SP term; with "mean" both terms
    are per-candidate averages, so for m = G the two reductions are the same attack."""
    model, x, _, gallery = cosine_setup
    idx = ATTACKED
    for m in (1, 3):
        mean = QueryAttack("-", m, eps=0.1, G=m, reduction="mean")(model, gallery, x[idx], idx).metrics
        total = QueryAttack("-", m, eps=0.1, G=m, reduction="sum")(model, gallery, x[idx], idx).metrics
        torch.testing.assert_close(mean["rank"], total["rank"])  # m = G: same balance, same signs
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean'"):
        QueryAttack("+", 1, eps=0.1, reduction="max")
