"""Retrieval metrics against plainly written brute-force references."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from robust_ranking.retrieval import RetrievalMetrics as PackageRetrievalMetrics
from robust_ranking.retrieval.metrics import (
    deduplicate_by_index,
    evaluate_retrieval,
    kmeans_nmi,
    map_at_r,
    mean_average_precision,
    normalized_mutual_info,
    rank_gallery,
    recall_at_k,
)
from robust_ranking.retrieval.retrieval_metrics import RetrievalMetrics


def l1_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a[:, None, :].float() - b[None, :, :].float()).abs().sum(-1)


# ----------------------------------------------------------------------- brute-force references
def ref_rankings(dist: torch.Tensor, exclude_self: bool) -> list[list[int]]:
    rows = dist.tolist()
    out = []
    for i, row in enumerate(rows):
        order = sorted(range(len(row)), key=lambda j: (row[j], j))
        if exclude_self:
            order.remove(i)
        out.append(order)
    return out


def ref_metrics(dist, q_labels, g_labels, exclude_self, ks=(1, 2, 4, 8)) -> dict[str, float]:
    q_labels, g_labels = q_labels.tolist(), g_labels.tolist()
    rankings = ref_rankings(dist, exclude_self)
    recall = {k: 0.0 for k in ks}
    ap_sum = apr_sum = 0.0
    for qi, order in enumerate(rankings):
        rel = [g_labels[j] == q_labels[qi] for j in order]
        for k in ks:
            recall[k] += any(rel[:k])
        num_rel = sum(rel)
        if num_rel == 0:
            continue
        hits, ap, apr = 0, 0.0, 0.0
        for pos, r in enumerate(rel, start=1):
            if r:
                hits += 1
                ap += hits / pos
                if pos <= num_rel:
                    apr += hits / pos
        ap_sum += ap / num_rel
        apr_sum += apr / num_rel
    n = len(rankings)
    out = {f"recall@{k}": v / n for k, v in recall.items()}
    out["map"] = ap_sum / n
    out["map@r"] = apr_sum / n
    return out


def assert_metrics_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


def tied_data(n: int, seed: int, num_labels: int = 5, dim: int = 3):
    """Integer-valued codes in {0, 1, 2}^dim: L1 distances are small integers with many ties."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 3, (n, dim), generator=g).float()
    labels = torch.randint(0, num_labels, (n,), generator=g)
    return codes, labels


# ----------------------------------------------------------------------- hand-made examples
def test_hand_made_example() -> None:
    dist = torch.tensor(
        [
            [0.1, 0.2, 0.3, 0.4, 0.5],  # rel by rank: 0 1 0 1 1
            [0.5, 0.4, 0.3, 0.2, 0.1],  # ranking 4 3 2 1 0 -> rel 0 0 1 0 1
            [1.0, 1.0, 1.0, 1.0, 1.0],  # all tied -> gallery order -> rel 1 0 1 0 0
            [0.3, 0.1, 0.2, 0.5, 0.4],  # label 7: no relevant item, contributes 0
        ]
    )
    g_labels = torch.tensor([1, 0, 1, 0, 0])
    q_labels = torch.tensor([0, 1, 1, 7])
    rec = recall_at_k(dist, q_labels, g_labels, ks=(1, 2, 4, 100))
    assert rec == pytest.approx({1: 0.25, 2: 0.5, 4: 0.75, 100: 0.75})
    aps = [(1 / 2 + 2 / 4 + 3 / 5) / 3, (1 / 3 + 2 / 5) / 2, (1 + 2 / 3) / 2, 0.0]
    assert mean_average_precision(dist, q_labels, g_labels) == pytest.approx(sum(aps) / 4)
    aprs = [(1 / 2) / 3, 0.0, 1 / 2, 0.0]
    assert map_at_r(dist, q_labels, g_labels) == pytest.approx(sum(aprs) / 4)


def test_hand_made_self_exclusion() -> None:
    codes = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    labels = torch.tensor([0, 0, 1, 1])
    dist = l1_distance(codes, codes)
    # Without exclusion every query finds itself first.
    assert recall_at_k(dist, labels, labels, ks=(1,))[1] == 1.0
    # Rankings without self: q0 -> 1,2,3 (rel 1 0 0); q1 -> 0,2,3 (1 0 0);
    # q2 -> 1,0,3 (0 0 1); q3 -> 2,1,0 (1 0 0).
    assert recall_at_k(dist, labels, labels, ks=(1, 3), exclude_self=True) == {1: 0.75, 3: 1.0}
    assert mean_average_precision(dist, labels, labels, exclude_self=True) == pytest.approx((3 + 1 / 3) / 4)
    assert map_at_r(dist, labels, labels, exclude_self=True) == pytest.approx(0.75)
    out = evaluate_retrieval(
        codes, labels, codes, labels, l1_distance, exclude_self=True, recall_ks=(1,), nmi=False
    )
    assert out == pytest.approx({"recall@1": 0.75, "map": (3 + 1 / 3) / 4, "map@r": 0.75})


def test_rank_gallery() -> None:
    dist = torch.tensor([[2.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert rank_gallery(dist).tolist() == [[3, 1, 2, 0], [0, 1, 2, 3]]
    exclude = torch.tensor([[False, True, False, False], [True, False, False, False]])
    assert rank_gallery(dist, exclude).tolist() == [[3, 2, 0], [1, 2, 3]]
    with pytest.raises(ValueError):
        rank_gallery(dist, torch.tensor([[True, True, False, False], [True, False, False, False]]))


# ----------------------------------------------------------------------- random data vs reference
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("num_labels", [5, 40])  # 40: many queries without any relevant item
def test_functional_matches_reference_with_ties(seed: int, exclude_self: bool, num_labels: int) -> None:
    codes, labels = tied_data(41, seed, num_labels)
    if exclude_self:
        q_codes, q_labels = codes, labels
    else:
        q_codes, q_labels = tied_data(23, seed + 100, num_labels)
    dist = l1_distance(q_codes, codes)
    ks = (1, 2, 4, 8, 50)
    want = ref_metrics(dist, q_labels, labels, exclude_self, ks)
    rec = recall_at_k(dist, q_labels, labels, ks, exclude_self=exclude_self)
    for k in ks:
        assert rec[k] == pytest.approx(want[f"recall@{k}"], abs=1e-9)
    got_map = mean_average_precision(dist, q_labels, labels, exclude_self)
    assert got_map == pytest.approx(want["map"], abs=1e-6)
    assert map_at_r(dist, q_labels, labels, exclude_self) == pytest.approx(want["map@r"], abs=1e-6)

    got = evaluate_retrieval(
        q_codes, q_labels, codes, labels, l1_distance,
        exclude_self=exclude_self, recall_ks=ks, chunk_size=7, nmi=False,
    )
    assert_metrics_close(got, want)


def test_evaluate_retrieval_float_codes_random() -> None:
    g = torch.Generator().manual_seed(3)
    codes = torch.randn(60, 8, generator=g)
    labels = torch.randint(0, 6, (60,), generator=g)
    got = evaluate_retrieval(codes, labels, codes, labels, torch.cdist, exclude_self=True, chunk_size=16)
    want = ref_metrics(torch.cdist(codes, codes), labels, labels, exclude_self=True)
    assert 0.0 <= got.pop("nmi") <= 1.0
    assert_metrics_close(got, want)


def test_self_exclusion_with_infinite_distances() -> None:
    # Many +inf entries: the self entry must be removed, not whatever sorts last.
    g = torch.Generator().manual_seed(4)
    n = 30
    dist = torch.randint(0, 3, (n, n), generator=g).float()
    dist[torch.rand(n, n, generator=g) < 0.5] = float("inf")
    labels = torch.randint(0, 3, (n,), generator=g)
    want = ref_metrics(dist, labels, labels, exclude_self=True)
    got_map = mean_average_precision(dist, labels, labels, exclude_self=True)
    assert got_map == pytest.approx(want["map"], abs=1e-6)
    assert map_at_r(dist, labels, labels, exclude_self=True) == pytest.approx(want["map@r"], abs=1e-6)
    rec = recall_at_k(dist, labels, labels, (1, 2, 4, 8), exclude_self=True)
    assert rec == pytest.approx({k: want[f"recall@{k}"] for k in (1, 2, 4, 8)})


def test_evaluate_retrieval_is_chunked_and_keeps_code_dtype() -> None:
    codes, labels = tied_data(50, seed=5)
    codes = codes.to(torch.uint8)  # non-float codes: the distance handles them, no NMI
    shapes, dtypes = [], []

    def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(a.shape[:1]) + tuple(b.shape[:1]))
        dtypes.append(a.dtype)
        return l1_distance(a, b)

    got = evaluate_retrieval(codes, labels, codes, labels, dist, exclude_self=True, chunk_size=8)
    assert "nmi" not in got
    assert max(s[0] for s in shapes) == 8 and all(s[1] == 50 for s in shapes)
    assert set(dtypes) == {torch.uint8}
    assert_metrics_close(got, ref_metrics(l1_distance(codes, codes), labels, labels, exclude_self=True))


def test_input_validation() -> None:
    codes, labels = tied_data(10, seed=6)
    with pytest.raises(ValueError):
        evaluate_retrieval(codes[:5], labels[:5], codes, labels, l1_distance, exclude_self=True)
    with pytest.raises(ValueError):
        recall_at_k(l1_distance(codes, codes), labels, labels, ks=(0,))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    codes, labels = tied_data(200, seed=7)
    cpu = evaluate_retrieval(codes, labels, codes, labels, l1_distance, exclude_self=True, chunk_size=64)
    gpu = evaluate_retrieval(
        codes.cuda(), labels.cuda(), codes.cuda(), labels.cuda(), l1_distance,
        exclude_self=True, chunk_size=64,
    )
    assert_metrics_close(gpu, cpu)


# ----------------------------------------------------------------------- clustering
@pytest.mark.parametrize(
    "labels_true, labels_pred",
    [
        ([0, 0, 1, 1], [0, 0, 1, 1]),
        ([0, 0, 1, 1], [1, 1, 0, 0]),
        ([0, 0, 0, 0], [0, 1, 2, 3]),
        ([0, 0, 0, 0], [5, 5, 5, 5]),
        ([0, 1, 2, 3], [0, 0, 0, 0]),
        ([3, 3, 7, 7, 9], [1, 2, 1, 2, 2]),
    ],
)
def test_nmi_edge_cases_match_sklearn(labels_true, labels_pred) -> None:
    want = normalized_mutual_info_score(labels_true, labels_pred)
    assert normalized_mutual_info(torch.tensor(labels_true), torch.tensor(labels_pred)) == pytest.approx(want)


@pytest.mark.parametrize("seed", range(4))
def test_nmi_random_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    t = rng.integers(0, int(rng.integers(2, 30)), n)
    p = rng.integers(0, int(rng.integers(2, 30)), n)
    p[: n // 2] = t[: n // 2]  # partially informative
    assert normalized_mutual_info(t, p) == pytest.approx(normalized_mutual_info_score(t, p), abs=1e-10)
    assert normalized_mutual_info(torch.from_numpy(t), torch.from_numpy(p)) == pytest.approx(
        normalized_mutual_info_score(t, p), abs=1e-10
    )


def test_kmeans_nmi_separated_clusters_and_determinism() -> None:
    g = torch.Generator().manual_seed(8)
    num_classes = 10
    centers = torch.randn(num_classes, 16, generator=g) * 50
    labels = torch.arange(num_classes).repeat_interleave(30)
    x = centers[labels] + torch.randn(len(labels), 16, generator=g)
    assert kmeans_nmi(x, labels) == pytest.approx(1.0, abs=1e-6)

    noisy = torch.randn(300, 16, generator=g)
    noisy_labels = torch.randint(0, 7, (300,), generator=g)
    first = kmeans_nmi(noisy, noisy_labels, seed=3)
    assert kmeans_nmi(noisy, noisy_labels, seed=3) == first
    assert 0.0 <= first < 0.5
    assert 0.0 <= kmeans_nmi(noisy, noisy_labels, num_clusters=3, seed=3) <= 1.0


# ----------------------------------------------------------------------- torchmetrics wrapper
def test_retrieval_metrics_import_paths() -> None:
    from robust_ranking import retrieval
    import robust_ranking.retrieval.metrics  # noqa: F401

    assert RetrievalMetrics is PackageRetrievalMetrics
    # the functional module does not know the class (imports go one way: class -> functional)
    assert not hasattr(retrieval.metrics, "RetrievalMetrics")


def _feed(metric: RetrievalMetrics, codes, labels, order: torch.Tensor, batch: int) -> None:
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        metric.update(codes[idx], labels[idx], idx)


def test_retrieval_metrics_shuffled_batches_with_duplicates() -> None:
    codes, labels = tied_data(45, seed=9)
    want = evaluate_retrieval(codes, labels, codes, labels, l1_distance, exclude_self=True, chunk_size=10)

    g = torch.Generator().manual_seed(10)
    order = torch.cat([torch.randperm(45, generator=g), torch.tensor([3, 17, 3, 44])])  # duplicates
    order = order[torch.randperm(len(order), generator=g)]
    metric = RetrievalMetrics(distance=l1_distance, chunk_size=10)
    _feed(metric, codes, labels, order, batch=8)
    got = metric.compute()
    assert got == want  # exactly equal, not just close
    assert set(got) == {"recall@1", "recall@2", "recall@4", "recall@8", "map", "map@r", "nmi"}

    metric.reset()
    _feed(metric, codes, labels, torch.arange(45), batch=45)
    assert metric.compute() == want


def test_retrieval_metrics_two_ranks_with_sampler_padding() -> None:
    # DistributedSampler(num_replicas=2, shuffle=False) on 45 items: rank r gets indices
    # r, r+2, ... of the list padded to 46 with index 0 again.
    codes, labels = tied_data(45, seed=11)
    want = evaluate_retrieval(codes, labels, codes, labels, l1_distance, exclude_self=True, recall_ks=(1, 3))
    padded = torch.cat([torch.arange(45), torch.tensor([0])])
    ranks = [RetrievalMetrics(distance=l1_distance, recall_ks=(1, 3)) for _ in range(2)]
    for r, metric in enumerate(ranks):
        _feed(metric, codes, labels, padded[r::2], batch=5)
    ranks[0].merge_state(ranks[1])
    assert ranks[0].compute() == want

    # Same through an explicit "all-gather" of the states (what dist_reduce_fx="cat" does).
    gathered = RetrievalMetrics(distance=l1_distance, recall_ks=(1, 3))
    fresh = [RetrievalMetrics(distance=l1_distance, recall_ks=(1, 3)) for _ in range(2)]
    for r, metric in enumerate(fresh):
        _feed(metric, codes, labels, padded[r::2], batch=5)
    gathered.update(
        torch.cat([torch.cat(m.codes) for m in fresh]),
        torch.cat([torch.cat(m.labels) for m in fresh]),
        torch.cat([torch.cat(m.indices) for m in fresh]),
    )
    assert gathered.compute() == want


def test_deduplicate_by_index() -> None:
    idx = torch.tensor([5, 2, 5, 0, 2])
    vals = torch.tensor([50, 20, 51, 0, 21])
    uniq, kept = deduplicate_by_index(idx, vals)
    assert uniq.tolist() == [0, 2, 5]
    assert kept.tolist() == [0, 20, 50]  # first occurrence wins


def test_retrieval_metrics_update_validation() -> None:
    metric = RetrievalMetrics(distance=l1_distance)
    with pytest.raises(ValueError):
        metric.update(torch.zeros(4, 2), torch.zeros(3), torch.arange(4))


def test_random_seeded_python_reference_consistency() -> None:
    # Guards the reference itself: with tie-free distances the ranking is the plain argsort.
    random.seed(12)
    dist = torch.tensor([[random.random() for _ in range(9)] for _ in range(4)])
    assert ref_rankings(dist, False) == torch.argsort(dist, dim=1).tolist()
