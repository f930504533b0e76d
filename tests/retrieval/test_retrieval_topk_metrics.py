"""Query / database metrics against plain-Python references, ties included."""

from __future__ import annotations

import pytest
import torch

from robust_ranking.retrieval.topk_metrics import evaluate_query_database, map_at_topk, precision_recall_at_cutoffs


def reference_ap(dist_row, qlabel, dblabels, topk):
    order = sorted(range(len(dist_row)), key=lambda j: (float(dist_row[j]), j))  # stable ties
    if topk is not None:
        order = order[:topk]
    hits, total = 0, 0.0
    for pos, j in enumerate(order, start=1):
        if int(dblabels[j]) == int(qlabel):
            hits += 1
            total += hits / pos
    return total / hits if hits else 0.0


@pytest.mark.parametrize("topk", [None, 1, 5, 17])
def test_map_at_topk_matches_reference_with_ties(topk):
    g = torch.Generator().manual_seed(0)
    distances = torch.randint(0, 4, (9, 30), generator=g).float()  # many exact ties (Hamming-like)
    qlabels, dblabels = torch.randint(0, 3, (9,), generator=g), torch.randint(0, 3, (30,), generator=g)
    expected = sum(reference_ap(distances[i], qlabels[i], dblabels, topk) for i in range(9)) / 9
    assert map_at_topk(distances, qlabels, dblabels, topk) == pytest.approx(expected, abs=1e-6)


def test_known_small_case():
    distances = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    # relevant at positions 1 and 3: AP = (1/1 + 2/3) / 2
    assert map_at_topk(distances, torch.tensor([1]), torch.tensor([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    assert map_at_topk(distances, torch.tensor([1]), torch.tensor([1, 0, 1, 0]), topk=2) == pytest.approx(1.0)
    assert map_at_topk(distances, torch.tensor([2]), torch.tensor([1, 0, 1, 0])) == 0.0


def test_precision_recall_and_chunked_evaluation():
    g = torch.Generator().manual_seed(1)
    q, db = torch.randn(11, 4, generator=g), torch.randn(40, 4, generator=g)
    ql, dl = torch.randint(0, 3, (11,), generator=g), torch.randint(0, 3, (40,), generator=g)
    d = torch.cdist(q, db)
    p, r = precision_recall_at_cutoffs(d, ql, dl, [1, 10, 40])
    rel = (dl[d.argsort(dim=1, stable=True)] == ql[:, None]).float()
    torch.testing.assert_close(p, torch.stack([rel[:, :k].mean(1).mean() for k in (1, 10, 40)]))
    torch.testing.assert_close(r[-1], torch.tensor(1.0))
    out = evaluate_query_database(q, ql, db, dl, torch.cdist, topks=(None, 5), pr_cutoffs=[1, 10, 40], chunk_size=4)
    assert out["map"] == pytest.approx(map_at_topk(d, ql, dl))
    assert out["map@5"] == pytest.approx(map_at_topk(d, ql, dl, 5))
    assert out["precision"] == pytest.approx(p.tolist())
