"""SDHA / SDHA-UW / HAG / DHTA: surrogate distance, directions, constraints, early termination, errors."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch

from robust_ranking.attacks import (
    AttackTrace,
    CandidateAttack,
    DHTAAttack,
    Gallery,
    HAGAttack,
    NotApplicableError,
    QueryAttack,
    SDHAAttack,
)
from robust_ranking.attacks.hashing.hashing_attack import HashingContext, logit_scale_factor, scaled_tanh_scales
from robust_ranking.attacks.hashing.surrogate_hamming import ap_weights, surrogate_hamming, weighted_surrogate_sum
from robust_ranking.data import SyntheticDataModule
from robust_ranking.lightning_modules import DCHLoss, DCHRanker, LeNet
from robust_ranking.retrieval import hamming_distance, sign_codes
from robust_ranking.retrieval.topk_metrics import map_at_topk
from run_helpers import fit_with_adam

FAST = {"eps": 0.3, "steps": 40, "check_every": 5}  # tiny 28x28 synthetic model: a large box, few steps


@dataclass
class TinyDCH:
    model: DCHRanker
    queries: torch.Tensor
    query_labels: torch.Tensor
    gallery: Gallery  # database sign codes + labels

    @property
    def indices(self) -> torch.Tensor:
        return torch.arange(len(self.query_labels))


@pytest.fixture(scope="module")
def tiny_dch() -> TinyDCH:
    dm = SyntheticDataModule(protocol="query_database", num_queries=16, test_per_class=8, seed=0)
    dm.setup()
    torch.manual_seed(0)
    model = DCHRanker(LeNet(embedding_dim=32), DCHLoss(gamma=20.0), hash_bits=16)
    fit_with_adam(model, dm, 3)
    model.eval()
    queries = torch.stack([dm.query_set[i][0] for i in range(len(dm.query_set))])
    database = torch.stack([dm.database_set[i][0] for i in range(len(dm.database_set))])
    return TinyDCH(model, queries, dm.query_labels, Gallery(model.encode(database), dm.database_labels))


# ----------------------------------------------------------------------------- surrogate
def reference_surrogate(f, h, sigma, targeted):
    """Eq. (4) / (8) dimension by dimension."""
    out = torch.zeros(f.shape[0], h.shape[0])
    for b in range(f.shape[0]):
        for i in range(h.shape[0]):
            total = 0.0
            for j in range(f.shape[1]):
                x = float(f[b, j] * h[i, j])
                gap = abs(float(f[b, j] - h[i, j])) / 2
                if targeted:
                    total += gap / (1 + math.exp(sigma * x))
                else:
                    s = 1 / (1 + math.exp(-sigma * x))
                    total += gap * s + (1 - s)
            out[b, i] = total
    return out


@pytest.mark.parametrize("targeted", [False, True])
def test_surrogate_matches_the_equations_and_the_matmul_form(targeted):
    g = torch.Generator().manual_seed(0)
    f = torch.tanh(torch.randn(3, 8, generator=g))
    h = sign_codes(torch.randn(5, 8, generator=g))
    d = surrogate_hamming(f, h, sigma=5.0, targeted=targeted)
    torch.testing.assert_close(d, reference_surrogate(f, h, 5.0, targeted), atol=1e-5, rtol=1e-5)
    w = torch.rand(3, 5, generator=g)
    torch.testing.assert_close(weighted_surrogate_sum(f, h, w, 5.0, targeted), (w * d).sum(1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targeted", [False, True])
def test_surrogate_tends_to_the_hamming_distance_as_sigma_grows(targeted):
    g = torch.Generator().manual_seed(1)
    h = sign_codes(torch.randn(20, 32, generator=g))
    binary = sign_codes(torch.randn(6, 32, generator=g))
    hamming = hamming_distance(binary, h)
    errors = [float((surrogate_hamming(binary, h, sigma, targeted) - hamming).abs().max())
              for sigma in (1.0, 3.0, 10.0, 30.0, 100.0)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 1.0 and errors[-1] < 1e-6
    # relaxed codes: the limit keeps |f_j - h_j| / 2 on the bits that agree (untargeted) /
    # disagree (targeted); it becomes the Hamming distance as the tanh saturates
    logits = torch.randn(6, 32, generator=g)
    logits = logits + 0.1 * logits.sign()  # away from 0, so that scale 100 saturates the tanh
    for scale in (1.0, 100.0):
        f = torch.tanh(scale * logits)
        gap = 0.5 * (f[:, None, :] - h[None]).abs()
        agree = (f[:, None, :] * h[None]) > 0
        limit = (gap * ~agree).sum(-1) if targeted else hamming_distance(sign_codes(f), h) + (gap * agree).sum(-1)
        torch.testing.assert_close(surrogate_hamming(f, h, 1e4, targeted), limit, atol=1e-3, rtol=1e-4)
    saturated = surrogate_hamming(torch.tanh(100 * logits), h, 1e4, targeted)
    assert float((saturated - hamming_distance(sign_codes(logits), h)).abs().max()) < 0.01


def test_ap_weights():
    d = torch.tensor([[0.0, 1.0, 4.0]])
    torch.testing.assert_close(ap_weights(d, 0.5), torch.tensor([[2**0.5, 1.0, 0.5]]))
    torch.testing.assert_close(ap_weights(d, -0.3), torch.tensor([[0.5**0.3, 1.0, 4**0.3]]))
    assert torch.equal(ap_weights(d, 0.0), torch.ones(1, 3))
    # A row's weights do not depend on where the row sits in the tensor (no vectorized-pow tail).
    hamming = torch.randint(0, 17, (7, 37), generator=torch.Generator().manual_seed(0)).float()
    for exponent in (0.5, -0.3):
        full = ap_weights(hamming, exponent)
        for row in range(7):
            assert torch.equal(ap_weights(hamming[row : row + 1], exponent), full[row : row + 1])
    with pytest.raises(ValueError, match="integer Hamming"):
        ap_weights(torch.tensor([[0.5, 1.0]]), 0.5)


@pytest.mark.parametrize("targeted", [False, True])
def test_sdha_objective_is_eq_1_over_every_relevant_item(targeted):
    """The distinct-code aggregation inside SDHA equals Eq. (1) with Eq. (6) / (7) summed item by item."""
    g = torch.Generator().manual_seed(2)
    protos = sign_codes(torch.randn(5, 16, generator=g))
    codes = protos[torch.randint(0, 5, (60,), generator=g)]
    labels = torch.randint(0, 3, (60,), generator=g)
    goal = torch.tensor([0, 1, 2])
    relevant = labels[None] == goal[:, None]
    f = torch.tanh(torch.randn(3, 16, generator=g))
    delta = torch.randn(3, 1, 4, 4, generator=g)
    ctx = HashingContext(codes, relevant, None, sign_codes(f), goal, torch.arange(3))
    attack = SDHAAttack(targeted, 1 if targeted else None, lagrange=30.0)
    got = attack.objective(f, sign_codes(f), delta, ctx, torch.arange(3), attack.prepare(ctx))
    exponent = -attack.z if targeted else attack.z
    w = ap_weights(hamming_distance(sign_codes(f), codes), exponent)
    d = reference_surrogate(f, codes, attack.sigma, targeted)
    f_value = (w * d * relevant).sum(1) / relevant.sum(1)
    expected = delta.flatten(1).norm(dim=1) + 30.0 / 16 * (f_value if targeted else -f_value)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- attacks
ATTACKS = {
    "SDHA": lambda: SDHAAttack(lagrange=100.0, **FAST),
    "SDHA-UW": lambda: SDHAAttack(z=0.0, lagrange=100.0, **FAST),
    "HAG": lambda: HAGAttack(**FAST),
    "SDHA-T": lambda: SDHAAttack(True, "random", lagrange=100.0, **FAST),
    "SDHA-UW-T": lambda: SDHAAttack(True, "random", z=0.0, lagrange=100.0, **FAST),
    "DHTA": lambda: DHTAAttack("random", lr=0.01, **FAST),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_moves_map_in_its_direction_within_the_constraints(tiny_dch, name):
    attack = ATTACKS[name]()
    assert attack.name == name
    result = attack(tiny_dch.model, tiny_dch.gallery, tiny_dch.queries, tiny_dch.indices,
                    query_labels=tiny_dch.query_labels)
    m = result.metrics
    if attack.targeted:
        assert float(m["ap"].mean()) > float(m["ap_clean"].mean()) + 0.3
        assert bool((result.goal_labels != tiny_dch.query_labels).all())
    else:
        assert float(m["ap"].mean()) < float(m["ap_clean"].mean()) - 0.3
        assert torch.equal(result.goal_labels, tiny_dch.query_labels)
    # constraints: the L-inf box and the pixel range
    assert float(result.perturbation.abs().max()) <= attack.eps + 1e-6
    assert float(result.adversarial.min()) >= 0.0 and float(result.adversarial.max()) <= 1.0
    torch.testing.assert_close(m["l2"], result.perturbation.flatten(1).norm(dim=1))
    # the reported AP is the AP@1000 of the adversarial codes against the database
    adv_codes = tiny_dch.model.encode(result.adversarial)
    measured = map_at_topk(hamming_distance(adv_codes, tiny_dch.gallery.embeddings), result.goal_labels,
                           tiny_dch.gallery.labels, 1000)
    assert measured == pytest.approx(float(m["ap"].mean()), abs=1e-6)
    # the trace starts at the clean query and ends at the result
    trace = result.trace
    assert trace.iterations.tolist() == list(range(0, 40, 5)) + [40]
    torch.testing.assert_close(trace.ap[:, 0], m["ap_clean"].cpu())
    torch.testing.assert_close(trace.ap[:, -1], m["ap"].cpu())
    torch.testing.assert_close(trace.l2[:, -1], m["l2"].cpu(), atol=1e-5, rtol=1e-5)


def test_early_termination_freezes_a_query_at_its_bound(tiny_dch):
    kwargs = dict(eps=0.3, steps=60, check_every=5, lagrange=100.0, topk=16)  # AP@16 can reach 0 (|X| = 128)
    result = SDHAAttack(**kwargs)(tiny_dch.model, tiny_dch.gallery, tiny_dch.queries, tiny_dch.indices,
                                  query_labels=tiny_dch.query_labels)
    m, trace = result.metrics, result.trace
    stopped = m["iterations"] < 60
    assert bool(stopped.any())
    assert bool((m["ap"][stopped] == 0).all())
    torch.testing.assert_close(m["l2"][stopped], m["l2_at_target"][stopped], atol=1e-5, rtol=1e-5)
    for row in torch.nonzero(stopped).flatten().tolist():  # constant after the stop
        col = trace.iterations.tolist().index(int(m["iterations"][row]))
        assert bool((trace.ap[row, col:] == 0).all()) and torch.allclose(trace.l2[row, col:], trace.l2[row, col])
    assert bool(torch.isnan(m["l2_at_target"][m["ap"] > 0]).all())
    assert torch.equal(m["success"], (m["ap"] == 0).float())
    # without early termination every query runs all steps
    full = SDHAAttack(early_stop=False, **kwargs)(tiny_dch.model, tiny_dch.gallery, tiny_dch.queries,
                                                 tiny_dch.indices, query_labels=tiny_dch.query_labels)
    assert bool((full.metrics["iterations"] == 60).all())


def test_goal_ap_sets_the_bound_of_success_and_early_termination(tiny_dch):
    """A looser bound than the paper's (AP 1 targeted) freezes each query as soon as it is good enough."""
    kwargs = dict(targeted=True, target_label="random", eps=0.3, steps=40, check_every=5, lagrange=100.0, topk=16)
    args = (tiny_dch.model, tiny_dch.gallery, tiny_dch.queries, tiny_dch.indices)
    paper = SDHAAttack(**kwargs)(*args, query_labels=tiny_dch.query_labels)
    loose = SDHAAttack(goal_ap=0.5, **kwargs)(*args, query_labels=tiny_dch.query_labels)
    m, trace = loose.metrics, loose.trace
    assert SDHAAttack(**kwargs).goal_ap == 1.0 and SDHAAttack(**FAST).goal_ap == 0.0
    assert torch.equal(m["success"], (m["ap"] >= 0.5).float())
    assert bool((m["iterations"] < paper.metrics["iterations"]).any())
    for row in range(len(m["ap"])):  # a successful query stopped at its first check with AP >= 0.5
        if m["success"][row]:
            first = int(torch.nonzero(trace.ap[row] >= 0.5).flatten()[0])
            assert int(trace.iterations[first]) == int(m["iterations"][row])
            assert float(m["l2_at_target"][row]) == pytest.approx(float(trace.l2[row, first]), abs=1e-6)
    with pytest.raises(ValueError, match="goal_ap must be an AP in"):
        DHTAAttack("random", goal_ap=1.5)


def _search_kwargs(targeted: bool) -> dict:
    kwargs = dict(eps=0.3, steps=30, check_every=5, lagrange=50.0, topk=16)
    if targeted:
        kwargs.update(targeted=True, target_label="random", goal_ap=0.6)
    return kwargs


@pytest.mark.parametrize("targeted", [False, True])
def test_binary_search_of_alpha_keeps_the_smallest_successful_perturbation(tiny_dch, targeted):
    """C&W-style search (SDHA Sec. 4.2): per query, success first, then the smallest l2; each query's
    result is the run of its chosen alpha; search_steps = 1 is the plain attack."""
    kwargs = _search_kwargs(targeted)
    args = (tiny_dch.model, tiny_dch.gallery, tiny_dch.queries, tiny_dch.indices)
    single = SDHAAttack(**kwargs)(*args, query_labels=tiny_dch.query_labels)
    assert bool((single.metrics["lagrange"] == 50.0).all())
    assert torch.equal(single.metrics["search_iterations"], single.metrics["iterations"])
    search = SDHAAttack(search_steps=4, **kwargs)(*args, query_labels=tiny_dch.query_labels)
    m, m1 = search.metrics, single.metrics
    ok1 = m1["success"].bool()
    assert bool(m["success"][ok1].all())  # success is never lost
    assert bool((m["l2"][ok1] <= m1["l2"][ok1] + 1e-6).all())  # and never with a larger perturbation
    assert bool((m["lagrange"][ok1] <= 50.0).all())  # successes move alpha down...
    assert bool((m["search_iterations"] >= m["iterations"]).all())
    assert bool((m["lagrange"] != 50.0).any())  # ... and some query took another alpha
    # the first run with alpha halved succeeds for some query with less l2: the search found it
    assert float(m["l2"][ok1].sum()) < float(m1["l2"][ok1].sum())
    # each query's result is the plain attack with its chosen alpha (rows are independent)
    for value in m["lagrange"].unique().tolist():
        rows = m["lagrange"] == value
        again = SDHAAttack(**{**kwargs, "lagrange": value})(*args, query_labels=tiny_dch.query_labels)
        torch.testing.assert_close(search.adversarial[rows], again.adversarial[rows])
        torch.testing.assert_close(search.trace.l2[rows], again.trace.l2[rows])
        assert torch.equal(m["ap"][rows], again.metrics["ap"][rows])


def test_binary_search_raises_alpha_for_queries_that_fail(tiny_dch):
    kwargs = dict(targeted=True, target_label="random", eps=0.3, steps=10, check_every=5, lagrange=0.5, topk=16,
                  goal_ap=0.9)
    args = (tiny_dch.model, tiny_dch.gallery, tiny_dch.queries, tiny_dch.indices)
    single = SDHAAttack(**kwargs)(*args, query_labels=tiny_dch.query_labels)
    failed = ~single.metrics["success"].bool()
    assert bool(failed.any())
    search = SDHAAttack(search_steps=3, **kwargs)(*args, query_labels=tiny_dch.query_labels)
    chosen = search.metrics["lagrange"][failed]
    assert bool((chosen >= 0.5).all()) and bool((chosen > 0.5).any())  # a failure moves alpha up (x10 at first)
    assert float(search.metrics["success"].sum()) > float(single.metrics["success"].sum())
    with pytest.raises(ValueError, match="search_steps"):
        SDHAAttack(search_steps=0)


@pytest.mark.parametrize("targeted", [False, True])
def test_results_do_not_depend_on_the_batch_composition(tiny_dch, targeted):
    """Queries stop at different times; masking (not shrinking) the batch keeps results per query,
    bit for bit (what makes DDP shards reproduce the single-process numbers; tests/evaluation/test_sdha_ddp.py):
    the targeted AP weights (exponent -0.3) once differed in the last bit with a query's row."""
    kwargs = dict(eps=0.3, steps=30, check_every=5, lagrange=100.0, topk=16)
    if targeted:
        kwargs.update(targeted=True, target_label="random")
    idx = tiny_dch.indices
    perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(1))
    args = (tiny_dch.model, tiny_dch.gallery)
    a = SDHAAttack(**kwargs)(*args, tiny_dch.queries, idx, query_labels=tiny_dch.query_labels)
    b = SDHAAttack(**kwargs)(*args, tiny_dch.queries[perm], idx[perm], query_labels=tiny_dch.query_labels[perm])
    if not targeted:
        assert len(set(a.metrics["iterations"].tolist())) > 1  # some stopped early, some did not
    assert torch.equal(b.adversarial, a.adversarial[perm])
    for key in ("ap", "l2", "iterations"):
        assert torch.equal(b.metrics[key], a.metrics[key][perm]), key


def test_a_query_already_at_its_bound_is_not_perturbed(tiny_dch):
    # untargeted: no relevant item in the database -> AP = 0 before any step
    absent = torch.full_like(tiny_dch.query_labels, 99)
    for attack in (SDHAAttack(**FAST), HAGAttack(**FAST)):
        r = attack(tiny_dch.model, tiny_dch.gallery, tiny_dch.queries, tiny_dch.indices, query_labels=absent)
        assert bool((r.metrics["iterations"] == 0).all()) and bool((r.perturbation == 0).all())
        assert bool((r.metrics["l2_at_target"] == 0).all())
    # targeted towards the query's own label on a model with clean AP 1
    assert float(SDHAAttack(**FAST)(tiny_dch.model, tiny_dch.gallery, tiny_dch.queries, tiny_dch.indices,
                                    query_labels=tiny_dch.query_labels).metrics["ap_clean"].min()) == 1.0
    label = int(tiny_dch.query_labels[0])
    same = tiny_dch.query_labels == label
    r = DHTAAttack(label, **FAST)(tiny_dch.model, tiny_dch.gallery, tiny_dch.queries[same], tiny_dch.indices[same],
                                  query_labels=tiny_dch.query_labels[same])
    assert bool((r.metrics["iterations"] == 0).all()) and bool((r.metrics["ap"] == 1).all())


def test_random_target_labels_are_keyed_by_sample_index(tiny_dch):
    attack = SDHAAttack(True, "random", seed=3, **{**FAST, "steps": 1})
    idx = tiny_dch.indices
    r1 = attack(tiny_dch.model, tiny_dch.gallery, tiny_dch.queries, idx, query_labels=tiny_dch.query_labels)
    perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))
    r2 = DHTAAttack("random", seed=3, **{**FAST, "steps": 1})(
        tiny_dch.model, tiny_dch.gallery, tiny_dch.queries[perm], idx[perm], query_labels=tiny_dch.query_labels[perm])
    assert torch.equal(r2.goal_labels, r1.goal_labels[perm])  # same targets whatever the batch / attack
    assert bool((r1.goal_labels != tiny_dch.query_labels).all())
    assert len(set(r1.goal_labels.tolist())) > 1
    fixed = SDHAAttack(True, 2, **{**FAST, "steps": 1})(tiny_dch.model, tiny_dch.gallery, tiny_dch.queries, idx,
                                                         query_labels=tiny_dch.query_labels)
    assert bool((fixed.goal_labels == 2).all())


def test_gallery_protocol_fallback_excludes_the_query_itself(tiny_dch):
    # queries that are gallery members: labels from the gallery, own entry out of the ranking
    db_codes, db_labels = tiny_dch.gallery.embeddings[:40], tiny_dch.gallery.labels[:40]
    n = len(db_labels)
    idx = torch.arange(0, n, 5)
    # rebuild gallery images from the codes is impossible; use clean queries whose codes we plant
    images = tiny_dch.queries[: len(idx)]
    codes = db_codes.clone()
    codes[idx] = tiny_dch.model.encode(images)
    gallery = Gallery(codes, db_labels)
    r = SDHAAttack(**{**FAST, "steps": 1})(tiny_dch.model, gallery, images, idx)
    d = hamming_distance(codes[idx], codes)
    d[torch.arange(len(idx)), idx] = float("inf")
    keep = torch.ones(len(idx), n, dtype=torch.bool)
    keep[torch.arange(len(idx)), idx] = False
    labels = db_labels[idx]
    expected = []
    for i in range(len(idx)):
        cols = torch.nonzero(keep[i]).flatten()
        expected.append(map_at_topk(d[i : i + 1, cols], labels[i : i + 1], db_labels[cols], 1000))
    assert r.metrics["ap_clean"].tolist() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(r.goal_labels, labels)


# ----------------------------------------------------------------------------- errors
def test_hashing_attacks_are_not_applicable_to_models_without_hash_codes(tiny_ranker):
    gallery = Gallery(tiny_ranker.model.embed(torch.rand(4, 1, 28, 28)).detach(), torch.arange(4))
    for attack in (SDHAAttack(**FAST), HAGAttack(**FAST), DHTAAttack(1, **FAST)):
        with pytest.raises(NotApplicableError, match="hash_bits"):
            attack(tiny_ranker.model, gallery, torch.rand(2, 1, 28, 28), torch.arange(2))


def test_targeted_attacks_without_a_target_label_are_refused():
    for make in (lambda: SDHAAttack(True), lambda: SDHAAttack(targeted=True, z=0.0), lambda: DHTAAttack()):
        with pytest.raises(ValueError, match="targeted attack and needs target_label"):
            make()
    with pytest.raises(ValueError, match="untargeted; target_label must be None"):
        SDHAAttack(False, 3)
    with pytest.raises(ValueError, match="target_label must be an int label or 'random'"):
        DHTAAttack("all")


def test_bad_inputs_are_clear_errors(tiny_dch):
    args = (tiny_dch.model, tiny_dch.gallery, tiny_dch.queries, tiny_dch.indices)
    with pytest.raises(ValueError, match="does not occur in the gallery labels"):
        SDHAAttack(True, 42, **FAST)(*args, query_labels=tiny_dch.query_labels)
    with pytest.raises(ValueError, match="query_labels must be"):
        SDHAAttack(**FAST)(*args, query_labels=tiny_dch.query_labels[:3])
    wrong_bits = Gallery(torch.ones(10, 8), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="hash_bits=16"):
        SDHAAttack(**FAST)(tiny_dch.model, wrong_bits, tiny_dch.queries[:2], torch.arange(2),
                           query_labels=tiny_dch.query_labels[:2])
    for bad in ({"tanh_scales": [(0.5, 0.1)]}, {"tanh_scales": [(0.0, -1.0)]}, {"topk": 0}, {"eps": 2.0}):
        with pytest.raises(ValueError):
            SDHAAttack(**bad)


def test_tanh_schedule_is_the_papers():
    attack = SDHAAttack(steps=1500)
    got = {step: attack.tanh_scale(step) for step in (0, 749, 750, 899, 900, 1050, 1200, 1350, 1499)}
    assert got == {0: 0.1, 749: 0.1, 750: 0.2, 899: 0.2, 900: 0.3, 1050: 0.5, 1200: 0.7, 1350: 1.0, 1499: 1.0}


def _scaled_copy(model: DCHRanker, c: float) -> DCHRanker:
    """The same model with its hash logits multiplied by ``c`` (same codes)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.hash_layer.weight.mul_(c)
        other.hash_layer.bias.mul_(c)
    return other


@pytest.mark.parametrize("targeted", [False, True])
def test_calibrated_tanh_schedule_makes_the_attack_independent_of_the_logit_scale(tiny_dch, targeted):
    """logit_scale_factor puts the gamma schedule in units of the model's own logits: rescaling the
    hash layer by 1/4 (exact in floating point, codes unchanged) leaves the calibrated attack bit for
    bit the same, while the paper's fixed schedule (tanh(0.1 g) of tiny logits) attacks differently."""
    small = _scaled_copy(tiny_dch.model, 0.25)
    q = tiny_dch.queries
    assert torch.equal(small.encode(q), tiny_dch.model.encode(q))
    factor, factor_small = logit_scale_factor(tiny_dch.model, q), logit_scale_factor(small, q)
    with torch.no_grad():
        assert factor == pytest.approx(1 / float(tiny_dch.model.hash_logits(q).abs().median()))
    assert factor_small == 4 * factor

    def attack(model, factor):
        kwargs = dict(eps=0.3, steps=30, check_every=5, lagrange=100.0, topk=16, tanh_scales=scaled_tanh_scales(factor))
        if targeted:
            kwargs.update(targeted=True, target_label="random")
        return SDHAAttack(**kwargs)(model, tiny_dch.gallery, q, tiny_dch.indices, query_labels=tiny_dch.query_labels)

    calibrated, calibrated_small = attack(tiny_dch.model, factor), attack(small, factor_small)
    assert torch.equal(calibrated.adversarial, calibrated_small.adversarial)
    assert torch.equal(calibrated.metrics["ap"], calibrated_small.metrics["ap"])
    fixed, fixed_small = attack(tiny_dch.model, 1.0), attack(small, 1.0)
    assert not torch.equal(fixed.adversarial, fixed_small.adversarial)


def test_logit_scale_factor_refuses_dead_logits(tiny_dch):
    with pytest.raises(ValueError, match="cannot calibrate"):
        logit_scale_factor(_scaled_copy(tiny_dch.model, 0.0), tiny_dch.queries)


# ----------------------------------------------------------------------------- dataset metrics
def test_trace_metrics():
    ap = torch.tensor([[0.9, 0.5, 0.0, 0.0], [0.8, 0.6, 0.4, 0.1]])
    l2 = torch.tensor([[0.0, 0.4, 0.6, 0.6], [0.0, 0.2, 0.8, 1.2]])
    trace = AttackTrace(torch.tensor([0, 10, 20, 30]), ap, l2, targeted=False)
    assert trace.map_curve().tolist() == pytest.approx([0.85, 0.55, 0.2, 0.05])
    assert trace.l2_at_map(0.25) == pytest.approx((0.7, True))
    l2_never, reached = trace.l2_at_map(0.01)
    assert not reached and l2_never == pytest.approx(0.9)
    assert trace.min_l2_at_map(0.25) == pytest.approx((0.7, True))
    assert trace.min_l2_at_map(0.01) == pytest.approx((0.9, False))
    shrinking = AttackTrace(torch.tensor([0, 10, 20]), torch.tensor([[0.9, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 1.0]]),
                            targeted=False)
    assert shrinking.l2_at_map(0.1) == pytest.approx((2.0, True))
    assert shrinking.min_l2_at_map(0.1) == pytest.approx((1.0, True))
    assert trace.map_at_l2(0.5) == pytest.approx(0.2)
    assert trace.map_at_l2(5.0) == pytest.approx(0.05)  # budget never spent: best mAP
    assert trace.final() == pytest.approx((0.05, 0.9))
    both = AttackTrace.cat([trace, trace])
    assert both.ap.shape == (4, 4) and both.l2_at_map(0.25) == pytest.approx(trace.l2_at_map(0.25))
    targeted = AttackTrace(torch.tensor([0, 10, 20, 30]), 1 - ap, l2, targeted=True)
    assert targeted.l2_at_map(0.75) == pytest.approx((0.7, True))
    assert targeted.map_at_l2(5.0) == pytest.approx(0.95)
    with pytest.raises(ValueError, match="same attack direction"):
        AttackTrace.cat([trace, targeted])


# ----------------------------------------------------------------------------- ECCV attacks on DCH
def test_ranking_attacks_run_on_dch_through_embed(tiny_dch):
    images = tiny_dch.queries
    gallery = Gallery(tiny_dch.model.embed(images).detach(), tiny_dch.query_labels)
    idx = torch.arange(8)
    ca = CandidateAttack("+", w=1, eps=0.3, steps=15)(tiny_dch.model, gallery, images[idx], idx)
    assert float(ca.metrics["rank"].mean()) < float(ca.metrics["rank_clean"].mean())
    qa = QueryAttack("+", m=1, eps=0.3, steps=15, G=2)(tiny_dch.model, gallery, images[idx], idx)
    assert float(qa.metrics["rank"].mean()) < float(qa.metrics["rank_clean"].mean())
