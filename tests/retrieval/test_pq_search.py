"""PQ search: SDC / ADC distances against brute force, faiss IndexPQ against the torch tables."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from robust_ranking.retrieval import PQIndex, adc_distance, decode_codes, faiss_pq_supported, pack_pq_codes, sdc_distance


def random_pq(m: int, k: int, d: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, d, generator=g), torch.randint(0, k, (n, m), generator=g)


def brute_force(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances by explicit differences (no ``|a|^2 + |b|^2 - 2ab`` rounding)."""
    return (a[:, None, :] - b[None, :, :]).pow(2).sum(-1).sqrt()


def test_sdc_equals_brute_force_distance_between_reconstructions():
    codebooks, codes = random_pq(m=3, k=16, d=5, n=40)
    queries = codes[:7]
    expected = brute_force(decode_codes(codebooks, queries), decode_codes(codebooks, codes))
    torch.testing.assert_close(sdc_distance(codebooks, queries, codes), expected, atol=1e-4, rtol=1e-4)


def test_adc_equals_brute_force_distance_to_reconstructions():
    codebooks, codes = random_pq(m=4, k=8, d=3, n=30)
    queries = torch.randn(6, 12, generator=torch.Generator().manual_seed(1))
    expected = brute_force(queries, decode_codes(codebooks, codes))
    torch.testing.assert_close(adc_distance(codebooks, queries, codes), expected, atol=1e-4, rtol=1e-4)


def test_distances_broadcast_over_leading_dims():
    codebooks, codes = random_pq(m=2, k=8, d=4, n=20)
    q_codes = codes[:6].view(2, 3, 2)
    q_vecs = torch.randn(2, 3, 8)
    assert sdc_distance(codebooks, q_codes, codes).shape == (2, 3, 20)
    torch.testing.assert_close(sdc_distance(codebooks, q_codes, codes)[1], sdc_distance(codebooks, q_codes[1], codes))
    torch.testing.assert_close(adc_distance(codebooks, q_vecs, codes)[0], adc_distance(codebooks, q_vecs[0], codes))


def test_adc_is_differentiable_in_the_query():
    codebooks, codes = random_pq(m=2, k=8, d=4, n=20)
    q = torch.randn(3, 8, requires_grad=True)
    adc_distance(codebooks, q, codes).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("nbits", [4, 6, 8, 9])
def test_code_packing_matches_faiss(nbits):
    """Our codes added with add_sa_codes are the codes faiss itself would store."""
    m, d = 3, 4
    codebooks, codes = random_pq(m=m, k=2**nbits, d=d, n=25)
    pq = faiss.ProductQuantizer(m * d, m, nbits)
    faiss.copy_array_to_vector(codebooks.numpy().reshape(-1), pq.centroids)
    faiss_codes = pq.compute_codes(np.ascontiguousarray(decode_codes(codebooks, codes).numpy()))
    np.testing.assert_array_equal(pack_pq_codes(codes, nbits), faiss_codes)


def assert_same_ranking(index_a: PQIndex, index_b: PQIndex, queries: torch.Tensor, k: int) -> None:
    d_a, i_a = index_a.search(queries, k)
    d_b, i_b = index_b.search(queries, k)
    # faiss picks its distance kernels by CPU: on an AVX512_SPR machine its SDC table has absolute
    # errors up to ~2^-11 (a self-distance of 4.9e-4 instead of 0, distances up to 7.4). The bound
    # is therefore relative to the largest distance; the rankings must still be identical.
    scale = max(1.0, float(d_b.abs().max()))
    torch.testing.assert_close(d_a, d_b, atol=1e-4 * scale, rtol=1e-4)
    assert torch.equal(i_a, i_b)


@pytest.mark.parametrize("mode, k_codewords", [("sdc", 256), ("adc", 16), ("adc", 512)])
def test_faiss_and_torch_backends_give_the_same_rankings(mode, k_codewords):
    codebooks, codes = random_pq(m=2, k=k_codewords, d=4, n=300)
    # duplicated codes: exact ties, which both backends break by database id
    codes = torch.cat([codes, codes[:50]])
    queries = codes[:9] if mode == "sdc" else torch.randn(9, 8, generator=torch.Generator().manual_seed(3))
    faiss_index, torch_index = PQIndex(codebooks, mode, "faiss"), PQIndex(codebooks, mode, "torch")
    for index in (faiss_index, torch_index):
        index.add(codes[:200])
        index.add(codes[200:])  # incremental adds keep consecutive ids
    assert faiss_index.ntotal == torch_index.ntotal == len(codes)
    assert_same_ranking(faiss_index, torch_index, queries, k=len(codes))
    # and the torch ranking is the stable sort of the exact distances
    expected = torch.sort(torch_index.distances(queries), dim=1, stable=True).indices
    assert torch.equal(torch_index.search(queries, len(codes))[1], expected)


def test_backend_choice_and_limits():
    codebooks, codes = random_pq(m=2, k=64, d=4, n=10)
    assert faiss_pq_supported(256, "sdc") and not faiss_pq_supported(64, "sdc") and faiss_pq_supported(64, "adc")
    assert not faiss_pq_supported(100, "adc")  # not a power of two
    with pytest.raises(ValueError, match="faiss IndexPQ cannot serve SDC with K=64"):
        PQIndex(codebooks, "sdc", "faiss")
    assert PQIndex(codebooks, "sdc").backend == "torch"
    assert PQIndex(codebooks, "adc").backend == "faiss"


def test_search_pads_and_checks_inputs():
    codebooks, codes = random_pq(m=2, k=16, d=4, n=5)
    for backend in ("faiss", "torch"):
        index = PQIndex(codebooks, "adc", backend)
        index.add(codes)
        dist, ids = index.search(torch.randn(2, 8), k=8)
        assert ids.shape == (2, 8) and (ids[:, 5:] == -1).all() and torch.isinf(dist[:, 5:]).all()
        with pytest.raises(ValueError, match="ADC queries must be vectors"):
            index.search(codes[:2], k=3)
    with pytest.raises(ValueError, match=r"codes must be in \[0, 16\)"):
        PQIndex(codebooks, "sdc", "torch").add(codes + 16)
