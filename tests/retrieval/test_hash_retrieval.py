"""Hamming search and hashing metrics against brute-force Python references, ties included."""

from __future__ import annotations

import pytest
import torch

from robust_ranking.retrieval import (
    HammingIndex,
    evaluate_hashing,
    hamming_distance,
    hamming_pr_curve,
    map_within_hamming_radius,
    pack_codes,
    packed_hamming_distance,
    sign_codes,
    unpack_codes,
)
from robust_ranking.retrieval.index import faiss_gpu_available
from robust_ranking.retrieval.topk_metrics import map_at_topk


def random_codes(n: int, bits: int, seed: int, duplicates: bool = True) -> torch.Tensor:
    """Sign codes with many exact duplicates (as a trained hashing model produces)."""
    g = torch.Generator().manual_seed(seed)
    codes = sign_codes(torch.randn(n, bits, generator=g))
    if duplicates:
        protos = sign_codes(torch.randn(4, bits, generator=g))
        pick = torch.rand(n, generator=g) < 0.6
        codes[pick] = protos[torch.randint(0, 4, (int(pick.sum()),), generator=g)]
    return codes


def brute_force_ranking(q: torch.Tensor, db: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per query: [(hamming distance, id)] sorted by distance then id, in plain Python."""
    out = []
    for row in q.tolist():
        pairs = [(sum(a != b for a, b in zip(row, item)), j) for j, item in enumerate(db.tolist())]
        out.append(sorted(pairs))
    return out


def reference_ap(ranked_ids, qlabel, dblabels, cut=None):
    ranked_ids = ranked_ids if cut is None else ranked_ids[:cut]
    hits, total = 0, 0.0
    for pos, j in enumerate(ranked_ids, start=1):
        if int(dblabels[j]) == int(qlabel):
            hits += 1
            total += hits / pos
    return total / hits if hits else 0.0


def test_pack_unpack_and_packed_distance():
    codes = random_codes(37, 24, seed=0)
    packed = pack_codes(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (37, 3)
    assert torch.equal(unpack_codes(packed), codes)
    assert torch.equal(pack_codes(codes > 0), packed)  # {0, 1} / bool codes pack the same
    other = random_codes(11, 24, seed=1)
    expected = (other[:, None, :] != codes[None, :, :]).sum(-1)
    assert torch.equal(packed_hamming_distance(pack_codes(other), packed, chunk_size=4), expected)
    assert torch.equal(hamming_distance(other, codes), expected.float())
    with pytest.raises(ValueError, match="divisible by 8"):
        pack_codes(torch.ones(2, 12))


@pytest.mark.parametrize("k", [1, 3, 50, 200, 250])
def test_hamming_index_breaks_ties_by_database_index(k):
    db, q = random_codes(200, 16, seed=2), random_codes(9, 16, seed=3)
    q[0] = db[7]  # a query with a large group of identical codes
    index = HammingIndex()
    index.add(db[:120])
    index.add(db[120:])  # ids continue across adds
    assert index.ntotal == 200 and index.num_bits == 16
    dist, ids = index.search(q, k)
    ref = brute_force_ranking(q, db)
    for i in range(len(q)):
        want = ref[i][: min(k, 200)]
        assert ids[i, : len(want)].tolist() == [j for _, j in want]
        assert dist[i, : len(want)].tolist() == [float(d) for d, _ in want]
    if k > 200:  # padded like faiss: id -1, distance inf
        assert bool((ids[:, 200:] == -1).all()) and bool(torch.isinf(dist[:, 200:]).all())


def test_hamming_index_errors_and_reset():
    index = HammingIndex()
    with pytest.raises(ValueError, match="divisible by 8"):
        index.add(torch.ones(3, 10))
    index.add(torch.ones(3, 16))
    with pytest.raises(ValueError, match="code length"):
        index.add(torch.ones(3, 8))
    index.reset()
    assert index.ntotal == 0
    dist, ids = index.search(torch.ones(2, 16), 2)
    assert bool((ids == -1).all())
    if not faiss_gpu_available():
        with pytest.raises(RuntimeError, match="HammingIndex.*GPU"):
            HammingIndex(use_gpu=True)


@pytest.mark.parametrize("topk", [None, 5, 60])
def test_hamming_map_matches_brute_force_with_ties(topk):
    db, q = random_codes(120, 16, seed=4), random_codes(10, 16, seed=5)
    g = torch.Generator().manual_seed(6)
    dl, ql = torch.randint(0, 3, (120,), generator=g), torch.randint(0, 3, (10,), generator=g)
    ref = brute_force_ranking(q, db)
    expected = sum(reference_ap([j for _, j in ref[i]], ql[i], dl, topk) for i in range(10)) / 10
    assert map_at_topk(hamming_distance(q, db), ql, dl, topk) == pytest.approx(expected, abs=1e-6)
    # and through the faiss index (the ids it returns, in its tie order)
    index = HammingIndex()
    index.add(db)
    _, ids = index.search(q, topk or 120)
    via_index = sum(reference_ap(ids[i].tolist(), ql[i], dl) for i in range(10)) / 10
    assert via_index == pytest.approx(expected, abs=1e-6)
    out = evaluate_hashing(q, ql, db, dl, topks=(topk,), chunk_size=3)
    assert out["map" if topk is None else f"map@{topk}"] == pytest.approx(expected, abs=1e-6)


def test_map_within_radius_and_pr_curve_match_references():
    db, q = random_codes(90, 8, seed=7), random_codes(12, 8, seed=8)
    g = torch.Generator().manual_seed(9)
    dl, ql = torch.randint(0, 3, (90,), generator=g), torch.randint(0, 3, (12,), generator=g)
    d = hamming_distance(q, db)
    ref = brute_force_ranking(q, db)
    for radius in (0, 2, 4):
        expected = [reference_ap([j for dist, j in ref[i] if dist <= radius], ql[i], dl) for i in range(12)]
        got = map_within_hamming_radius(d, ql, dl, radius)
        assert got.tolist() == pytest.approx(expected, abs=1e-6)
    precision, recall = hamming_pr_curve(d, ql, dl, 8)
    for r in range(9):
        ps, rs = [], []
        for i in range(12):
            inside = [j for dist, j in ref[i] if dist <= r]
            rel = sum(int(dl[j] == ql[i]) for j in inside)
            ps.append(rel / len(inside) if inside else 0.0)
            rs.append(rel / max(int((dl == ql[i]).sum()), 1))
        assert float(precision[r]) == pytest.approx(sum(ps) / 12, abs=1e-6)
        assert float(recall[r]) == pytest.approx(sum(rs) / 12, abs=1e-6)
    assert float(recall[-1]) == pytest.approx(float((dl[None] == ql[:, None]).any(1).float().mean()))
    out = evaluate_hashing(q, ql, db, dl, topks=(1000,), radius=2, chunk_size=5)
    assert out["map@H<=2"] == pytest.approx(float(map_within_hamming_radius(d, ql, dl, 2).mean()), abs=1e-6)
    assert out["precision@H<=2"] == pytest.approx(float(precision[2]), abs=1e-6)
    assert len(out["pr_radius_precision"]) == 9
