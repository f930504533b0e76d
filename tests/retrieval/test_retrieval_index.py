"""Exact search indexes: torch brute force vs faiss, tie order, padding, GPU-faiss errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import robust_ranking.retrieval.index as index_module
from robust_ranking.retrieval.index import FaissFlatIndex, RetrievalIndex, TorchFlatIndex, faiss_gpu_available, stable_topk


def euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Exact (difference-based) distances so the torch reference is not itself approximate.
    return (a[:, None, :] - b[None, :, :]).pow(2).sum(-1).sqrt()


def one_minus_ip(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1.0 - a @ b.T


def hamming_packed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Integer distance between uint8 codes: many exact ties."""
    x = a[:, None, :] ^ b[None, :, :]
    bits = torch.stack([(x >> s) & 1 for s in range(8)], dim=-1)
    return bits.sum(dim=(-1, -2))


def test_protocol_conformance() -> None:
    assert isinstance(TorchFlatIndex(euclidean), RetrievalIndex)
    assert isinstance(FaissFlatIndex("l2", use_gpu=False), RetrievalIndex)


@pytest.mark.parametrize("seed", range(3))
def test_stable_topk_matches_stable_sort(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    d = torch.randint(0, 4, (17, 50), generator=g).float()
    d[torch.rand(17, 50, generator=g) < 0.1] = float("inf")
    for k in (1, 3, 10, 50):
        vals, ids = stable_topk(d, k)
        ref = torch.sort(d, dim=1, stable=True)
        assert torch.equal(ids, ref.indices[:, :k])
        assert torch.equal(vals, ref.values[:, :k])


def test_torch_index_ties_broken_by_gallery_index() -> None:
    g = torch.Generator().manual_seed(0)
    db = torch.randint(0, 256, (60, 2), generator=g, dtype=torch.uint8)
    queries = torch.randint(0, 256, (13, 2), generator=g, dtype=torch.uint8)
    index = TorchFlatIndex(hamming_packed, chunk_size=4)
    index.add(db[:25])
    index.add(db[25:])  # ids continue across adds
    assert index.ntotal == 60
    dist, ids = index.search(queries, k=10)
    full = hamming_packed(queries, db)
    # Brute-force reference: sort each row by (distance, index).
    for q in range(13):
        row = full[q].tolist()
        ref = sorted(range(60), key=lambda j: (row[j], j))[:10]
        assert ids[q].tolist() == ref
        assert dist[q].tolist() == [float(row[j]) for j in ref]
    assert dist.dtype == torch.float32 and ids.dtype == torch.long


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_faiss_matches_torch_on_tie_free_data(metric: str) -> None:
    g = torch.Generator().manual_seed(1)
    db = torch.randn(300, 16, generator=g)
    queries = torch.randn(40, 16, generator=g)
    if metric == "ip":
        db, queries = F.normalize(db, dim=1), F.normalize(queries, dim=1)
    dist_fn = euclidean if metric == "l2" else one_minus_ip
    k = 8

    t_index = TorchFlatIndex(dist_fn, chunk_size=16)
    f_index = FaissFlatIndex(metric, use_gpu=False)
    for part in (db[:100], db[100:]):
        t_index.add(part)
        f_index.add(part)
    assert f_index.ntotal == t_index.ntotal == 300
    t_dist, t_ids = t_index.search(queries, k)
    f_dist, f_ids = f_index.search(queries, k)
    assert f_ids.dtype == torch.long and f_dist.dtype == torch.float32
    torch.testing.assert_close(f_dist, t_dist, atol=1e-4, rtol=1e-4)
    # faiss computes distances in float32 via BLAS: neighbours may only swap where the exact
    # distances are (near-)tied, which random Gaussian data essentially never has.
    full = dist_fn(queries, db)
    sorted_d = torch.sort(full, dim=1).values[:, : k + 1]
    near_tie = (sorted_d[:, 1:] - sorted_d[:, :-1]).abs().min(dim=1).values < 1e-5
    assert (~near_tie).sum() >= 35
    assert torch.equal(f_ids[~near_tie], t_ids[~near_tie])


def test_padding_when_k_exceeds_ntotal_and_reset() -> None:
    db = torch.randn(3, 4)
    queries = torch.randn(2, 4)
    for index in (TorchFlatIndex(euclidean), FaissFlatIndex("l2", use_gpu=False)):
        index.add(db)
        dist, ids = index.search(queries, k=5)
        assert dist.shape == ids.shape == (2, 5)
        assert (ids[:, 3:] == -1).all() and torch.isinf(dist[:, 3:]).all()
        assert sorted(ids[0, :3].tolist()) == [0, 1, 2]
        index.reset()
        assert index.ntotal == 0
        index.add(db[:1])
        assert index.search(queries, k=1)[1].tolist() == [[0], [0]]


def test_faiss_gpu_request_without_gpu_faiss_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "faiss_gpu_available", lambda: False)
    with pytest.raises(RuntimeError, match="faiss-gpu"):
        FaissFlatIndex("l2", use_gpu=True)
    # Auto mode silently falls back to CPU.
    assert FaissFlatIndex("ip").use_gpu is False


def test_faiss_gpu_available_is_bool() -> None:
    assert isinstance(faiss_gpu_available(), bool)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        FaissFlatIndex("cosine")  # type: ignore[arg-type]
    index = FaissFlatIndex("l2", use_gpu=False)
    index.add(torch.randn(5, 4))
    with pytest.raises(ValueError):
        index.add(torch.randn(5, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_index_on_cuda_matches_cpu() -> None:
    g = torch.Generator().manual_seed(2)
    db = torch.randint(0, 256, (200, 4), generator=g, dtype=torch.uint8)
    queries = torch.randint(0, 256, (30, 4), generator=g, dtype=torch.uint8)
    cpu_index, gpu_index = TorchFlatIndex(hamming_packed), TorchFlatIndex(hamming_packed)
    cpu_index.add(db)
    gpu_index.add(db.cuda())
    c_dist, c_ids = cpu_index.search(queries, 20)
    g_dist, g_ids = gpu_index.search(queries.cuda(), 20)
    assert g_ids.is_cuda
    assert torch.equal(g_ids.cpu(), c_ids) and torch.equal(g_dist.cpu(), c_dist)


@pytest.mark.gpu
@pytest.mark.skipif(not faiss_gpu_available(), reason="needs GPU faiss")
def test_gpu_faiss_matches_cpu_faiss() -> None:
    g = torch.Generator().manual_seed(3)
    db, queries = torch.randn(500, 32, generator=g), torch.randn(20, 32, generator=g)
    cpu_index, gpu_index = FaissFlatIndex("l2", use_gpu=False), FaissFlatIndex("l2", use_gpu=True)
    cpu_index.add(db)
    gpu_index.add(db)
    torch.testing.assert_close(
        gpu_index.search(queries, 5)[0], cpu_index.search(queries, 5)[0], atol=1e-4, rtol=1e-4
    )
