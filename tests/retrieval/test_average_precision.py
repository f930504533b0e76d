"""The functional average precision against brute force (plain Python loops), ties included.

In the style of the torchmetrics / pytorch-metric-learning tests: small random rankings with many
exact distance ties, every AP variant of :mod:`retrieval.average_precision` recomputed by a loop
over the ranked list, plus the callers (metric functions and attacks) checked to return exactly
the functional module's numbers.
"""

from __future__ import annotations

import ast
import random

import pytest
import torch

from robust_ranking.retrieval.average_precision import average_precision, average_precisions, ranked_relevance, stable_ranking
from run_helpers import REPO



# --------------------------------------------------------------------------- brute-force references
def ref_ranking(row: list[float], exclude: int | None = None) -> list[int]:
    """Ascending distance, ties by database index; ``exclude`` dropped."""
    order = sorted(range(len(row)), key=lambda j: (row[j], j))
    return [j for j in order if j != exclude]


def ref_ap(rel: list[bool], k) -> float:
    """AP of one ranked list: ``None`` (1/R over the list), int (AP@k, 1/R_k), ``"R"`` (AP@R, 1/R)."""
    num_rel = sum(rel)
    if k is None:
        cut, denom = len(rel), num_rel
    elif k == "R":
        cut, denom = num_rel, num_rel
    else:
        cut = min(k, len(rel))
        denom = sum(rel[:cut])
    hits, total = 0, 0.0
    for i in range(cut):
        if rel[i]:
            hits += 1
            total += hits / (i + 1)
    return total / denom if denom else 0.0


def random_problem(seed: int, num_q: int = 6, num_n: int = 25, num_labels: int = 3, num_values: int = 4):
    """Integer distances in ``[0, num_values)`` (many exact ties, Hamming-like) and labels."""
    g = torch.Generator().manual_seed(seed)
    distances = torch.randint(0, num_values, (num_q, num_n), generator=g).float()
    query_labels = torch.randint(0, num_labels, (num_q,), generator=g)
    database_labels = torch.randint(0, num_labels, (num_n,), generator=g)
    return distances, query_labels, database_labels


VARIANTS = [None, 1, 3, 10, 40, "R"]  # 40 > N: the whole list


# --------------------------------------------------------------------------- ranking
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("exclude_self", [False, True])
def test_stable_ranking_and_relevance_match_reference(seed: int, exclude_self: bool) -> None:
    d, ql, dl = random_problem(seed, num_q=8, num_n=8 if exclude_self else 25)
    if exclude_self:
        d[0, :] = float("inf")  # other +inf entries after the self entry: the mask fallback
    exclude = torch.arange(d.shape[0]) if exclude_self else None
    order = stable_ranking(d, exclude)
    expected = [ref_ranking(row, i if exclude_self else None) for i, row in enumerate(d.tolist())]
    assert order.tolist() == expected
    for topk in (None, 3):
        rel = ranked_relevance(d, ql, dl, topk=topk, exclude_index=exclude)
        assert rel.dtype == torch.bool
        assert rel.tolist() == [[int(dl[j]) == int(ql[i]) for j in row[:topk]] for i, row in enumerate(expected)]


def test_stable_ranking_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        stable_ranking(torch.zeros(3))
    with pytest.raises(ValueError):
        stable_ranking(torch.zeros(2, 3), torch.tensor([0, 1, 2]))


# --------------------------------------------------------------------------- average precision
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_average_precision_matches_brute_force(seed: int, k, dtype: torch.dtype) -> None:
    d, ql, dl = random_problem(seed)
    rel = ranked_relevance(d, ql, dl)
    got = average_precision(rel, k, dtype=dtype)
    assert got.dtype == dtype and got.shape == (d.shape[0],)
    expected = [ref_ap(row, k) for row in rel.tolist()]
    # the terms P(i) rel(i) are float32 in both variants; dtype is the accumulation
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_average_precision_random_lists_brute_force(seed: int) -> None:
    """Random relevance lists directly (including empty and all-relevant rows)."""
    rng = random.Random(seed)
    rows = [[rng.random() < p for _ in range(30)] for p in (0.0, 0.05, 0.3, 0.7, 1.0)]
    rel = torch.tensor(rows)
    for k in VARIANTS:
        for dtype in (torch.float32, torch.float64):
            assert average_precision(rel, k, dtype=dtype).tolist() == pytest.approx(
                [ref_ap(r, k) for r in rows], abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_variants_are_consistent_bit_for_bit(dtype: torch.dtype) -> None:
    """AP@k is AP of the cut list; the shared pass equals single calls; 0 / 1 input equals bool."""
    g = torch.Generator().manual_seed(0)
    rel = torch.rand(7, 300, generator=g) < 0.2
    for k in (1, 5, 17, 300, 1000):
        assert torch.equal(average_precision(rel, k, dtype=dtype), average_precision(rel[:, :k], dtype=dtype))
    together = average_precisions(rel, VARIANTS, dtype=dtype)
    for k, ap in zip(VARIANTS, together):
        assert torch.equal(ap, average_precision(rel, k, dtype=dtype))
    assert torch.equal(average_precision(rel.float(), dtype=dtype), average_precision(rel, dtype=dtype))


def test_known_small_case() -> None:
    rel = torch.tensor([[True, False, True, False]])  # relevant at ranks 1 and 3
    assert average_precision(rel).item() == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(rel, 2).item() == pytest.approx(1.0)  # R_2 = 1: (1/1) / 1
    assert average_precision(rel, "R").item() == pytest.approx(1 / 2)  # R = 2: (1/1) / 2
    none = torch.zeros(2, 4, dtype=torch.bool)
    for k in VARIANTS:
        assert average_precision(none, k).tolist() == [0.0, 0.0]
    empty = torch.zeros(3, 0, dtype=torch.bool)
    assert average_precision(empty, dtype=torch.float64).tolist() == [0.0, 0.0, 0.0]


def test_average_precision_rejects_bad_arguments() -> None:
    rel = torch.ones(2, 3, dtype=torch.bool)
    for k in (0, -1, True, 2.5, "r"):
        with pytest.raises(ValueError):
            average_precision(rel, k)
    with pytest.raises(ValueError):
        average_precision(rel, dtype=torch.float16)
    with pytest.raises(ValueError):
        average_precision(torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [None, 1, 4, 30])
def test_agrees_with_torchmetrics_without_ties(seed: int, k) -> None:
    """torchmetrics' retrieval AP (AP@k normalized by the relevant items in the top k) on tie-free scores."""
    from torchmetrics.functional.retrieval import retrieval_average_precision

    g = torch.Generator().manual_seed(seed)
    num_n = 20
    for _ in range(5):
        target = torch.rand(num_n, generator=g) < 0.3
        scores = torch.randperm(num_n, generator=g).float() + 1.0  # distinct, > 0 (torchmetrics needs > 0)
        rel = target[torch.argsort(scores, descending=True)][None]
        expected = float(retrieval_average_precision(scores, target, top_k=k))
        assert average_precision(rel, k).item() == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------- the callers
def test_metric_functions_return_the_functional_numbers() -> None:
    from robust_ranking.retrieval.metrics import map_at_r, mean_average_precision
    from robust_ranking.retrieval.topk_metrics import evaluate_query_database, map_at_topk

    d, ql, dl = random_problem(7, num_q=9, num_n=40)
    rel = ranked_relevance(d, ql, dl)
    for k in (None, 5):
        assert map_at_topk(d, ql, dl, k) == float(average_precision(rel, k).mean())
    assert mean_average_precision(d, ql, dl) == float(average_precision(rel, dtype=torch.float64).sum()) / 9
    assert map_at_r(d, ql, dl) == float(average_precision(rel, "R", dtype=torch.float64).sum()) / 9
    out = evaluate_query_database(d, ql, d, dl, lambda a, b: a, topks=(None, 5), chunk_size=9)
    assert out["map"] == float(average_precision(rel).sum()) / 9
    assert out["map@5"] == float(average_precision(rel, 5).sum()) / 9

    square, labels = d[:, :9], dl[:9]
    rel_self = ranked_relevance(square, labels, labels, exclude_index=torch.arange(9))
    assert mean_average_precision(square, labels, labels, exclude_self=True) == \
        float(average_precision(rel_self, dtype=torch.float64).sum()) / 9


def test_hamming_ball_ap_is_the_masked_full_ap() -> None:
    from robust_ranking.retrieval.hashing_metrics import map_within_hamming_radius

    d, ql, dl = random_problem(2, num_values=5)
    rel = ranked_relevance(d, ql, dl)
    inside = torch.sort(d, dim=1, stable=True).values <= 2
    assert torch.equal(map_within_hamming_radius(d, ql, dl, radius=2), average_precision(rel & inside))
    for i, (row, ball) in enumerate(zip(rel.tolist(), inside.tolist())):
        kept = [r and b for r, b in zip(row, ball)]
        assert map_within_hamming_radius(d[i : i + 1], ql[i : i + 1], dl, 2).item() == pytest.approx(
            ref_ap(kept, None), abs=1e-6)


AP_CALLERS = [
    "robust_ranking/retrieval/metrics.py",
    "robust_ranking/retrieval/topk_metrics.py",
    "robust_ranking/retrieval/hashing_metrics.py",
    "robust_ranking/attacks/quantization/pq_ag_attack.py",
    "robust_ranking/attacks/universal/uap_retrieval.py",
    "robust_ranking/attacks/hashing/hashing_attack.py",
]


@pytest.mark.parametrize("path", AP_CALLERS)
def test_callers_use_the_functional_module(path: str) -> None:
    """Every AP user imports its AP from the functional module."""
    tree = ast.parse((REPO / path).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "robust_ranking.retrieval.average_precision"
        for alias in node.names
    }
    assert imported & {"average_precision", "average_precisions"}, f"{path} does not call retrieval.average_precision"
