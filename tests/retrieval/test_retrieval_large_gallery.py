"""The faiss path of the metrics for large galleries equals the brute-force torch path.

The path is forced with a zero threshold (``faiss_threshold=0`` or ``FAISS_MIN_GALLERY`` patched)
on small galleries built so that both distance computations are exact (small-integer / +-1
coordinates, integer PQ codebooks, Hamming codes): every tie is an exact tie in both, so the
numbers must be identical, including the tie order (gallery index). CPU faiss only; the GPU
choice is the small function ``search_backend``, tested with a patched ``faiss.get_num_gpus``.
"""

from __future__ import annotations

import faiss
import pytest
import torch
import torch.nn.functional as F

from robust_ranking.lightning_modules.distances import cosine_distance, euclidean_distance
from robust_ranking.retrieval import index as index_module
from robust_ranking.retrieval.hamming_index import HammingIndex
from robust_ranking.retrieval.hashing_metrics import evaluate_hashing, hamming_distance
from robust_ranking.retrieval.index import (
    FAISS_MIN_GALLERY,
    GPU_MAX_K,
    FaissFlatIndex,
    query_chunk_rows,
    search_backend,
    stable_topk,
)
from robust_ranking.retrieval.metrics import evaluate_retrieval
from robust_ranking.retrieval.pq_index import PQIndex
from robust_ranking.retrieval.pq_search import adc_distance, sdc_distance
from robust_ranking.retrieval.topk_metrics import evaluate_query_database


# ----------------------------------------------------------------------------- the decision
@pytest.fixture
def gpu_faiss(monkeypatch):
    """Pretend GPU faiss is installed and sees ``n`` GPUs: ``gpu_faiss(n)``."""

    def set_gpus(n: int) -> None:
        monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: n)

    return set_gpus


def test_backend_small_galleries_stay_torch(gpu_faiss):
    gpu_faiss(1)
    assert search_backend(FAISS_MIN_GALLERY, 10, "cpu") == "torch"
    assert search_backend(FAISS_MIN_GALLERY, 10, "cuda") == "torch"
    assert search_backend(100, 10, "cpu", threshold=100) == "torch"
    assert search_backend(101, 10, "cpu", threshold=100) == "faiss-cpu"


def test_backend_gpu_needs_cuda_tensors_gpu_faiss_and_small_k(gpu_faiss, monkeypatch):
    n = FAISS_MIN_GALLERY + 1
    gpu_faiss(1)
    assert search_backend(n, GPU_MAX_K, "cuda") == "faiss-gpu"
    assert search_backend(n, GPU_MAX_K, torch.device("cuda", 0)) == "faiss-gpu"
    assert search_backend(n, GPU_MAX_K, "cpu") == "faiss-cpu"  # CPU tensors: CPU faiss
    assert search_backend(n, GPU_MAX_K + 1, "cuda") == "torch"  # whole ranking on CUDA: torch sort on the GPU
    assert search_backend(n, GPU_MAX_K + 1, "cpu") == "torch"  # and on the CPU (faster than faiss k = N)
    gpu_faiss(0)  # GPU build, no GPU visible
    assert search_backend(n, 10, "cuda") == "torch"
    assert search_backend(n, 10, "cpu") == "faiss-cpu"
    monkeypatch.delattr(faiss, "StandardGpuResources")  # CPU build (even if it reported a GPU)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 4)
    assert search_backend(n, 10, "cuda") == "torch"

    def broken() -> int:
        raise RuntimeError("CUDA driver version is insufficient")

    gpu_faiss(1)
    monkeypatch.setattr(faiss, "get_num_gpus", broken)
    assert search_backend(n, 10, "cuda") == "torch"


def test_default_threshold_is_read_at_call_time(monkeypatch):
    monkeypatch.setattr(index_module, "FAISS_MIN_GALLERY", 10)
    assert search_backend(11, 5, "cpu") == "faiss-cpu"


def test_query_chunk_rows():
    assert query_chunk_rows(1000, 1024) == 1024  # small galleries: the chunk size as given
    assert query_chunk_rows(50_000, 1024) == 1024
    assert query_chunk_rows(1_000_000, 1024, max_elements=1 << 26) == (1 << 26) // 1_000_000
    assert query_chunk_rows(10**9, 1024) == 1


# ----------------------------------------------------------------------------- data with exact ties
def _labels(n: int, classes: int, seed: int) -> torch.Tensor:
    return torch.randint(classes, (n,), generator=torch.Generator().manual_seed(seed))


def _int_embeddings(n: int, dim: int, seed: int) -> torch.Tensor:
    """Small-integer coordinates: squared distances are exact integers in both paths; duplicates tie."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, dim), generator=g).float()
    x[n // 2 :: 7] = x[: len(x[n // 2 :: 7])]  # exact duplicates -> ties across the gallery
    return x


def _sign_unit_embeddings(n: int, dim: int, seed: int) -> torch.Tensor:
    """+-1 / sqrt(dim) (dim a power of 4): normalized exactly, inner products exact multiples of 1/dim."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n, dim), generator=g).float() * 2 - 1) / dim**0.5


def _flat_factory(metric: str):
    def build(codes: torch.Tensor, use_gpu: bool | None = False) -> FaissFlatIndex:
        assert use_gpu is False  # CPU tensors never ask for GPU faiss
        index = FaissFlatIndex(metric, use_gpu=use_gpu)
        index.add(codes)
        return index

    return build


def _both_paths(fn, **kwargs):
    brute = fn(faiss_threshold=10**9, **kwargs)
    fast = fn(faiss_threshold=0, **kwargs)
    return brute, fast


# ----------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize(
    "metric, distance, make",
    [("ip", cosine_distance, _sign_unit_embeddings), ("l2", euclidean_distance, _int_embeddings)],
    ids=["cosine", "euclidean"],
)
@pytest.mark.parametrize("chunk_size", [1024, 7])
def test_embeddings_query_set_is_gallery(metric, distance, make, chunk_size):
    x = make(300, 16, seed=1)
    y = _labels(300, 6, seed=2)
    brute, fast = _both_paths(
        lambda distance=distance, **kw: evaluate_retrieval(x, y, x, y, distance, exclude_self=True, recall_ks=(1, 2, 8), nmi=False,
                                        chunk_size=chunk_size, **kw),
        index_factory=_flat_factory(metric),
    )
    assert brute == fast
    # the data really has ties in the torch distances
    assert (distance(x[:50], x) == distance(x[:50], x)[:, :1]).sum() > 50


@pytest.mark.parametrize(
    "metric, distance, make",
    [("ip", cosine_distance, _sign_unit_embeddings), ("l2", euclidean_distance, _int_embeddings)],
    ids=["cosine", "euclidean"],
)
def test_embeddings_query_database(metric, distance, make):
    db, q = make(400, 16, seed=3), make(60, 16, seed=4)
    y_db, y_q = _labels(400, 5, seed=5), _labels(60, 5, seed=6)
    for topks in [(1, 10, 50), (10, None)]:
        brute, fast = _both_paths(
            lambda topks=topks, **kw: evaluate_query_database(q, y_q, db, y_db, distance, topks=topks, pr_cutoffs=(1, 5, 33, 1000),
                                                 chunk_size=16, **kw),
            index_factory=_flat_factory(metric),
        )
        assert brute == fast


def test_random_gaussian_embeddings():
    """Float embeddings in general: faiss and torch compute the distances with different float32
    rounding, so two items closer than ~1 ulp may swap (here two rows of the L2 ranking do): the
    numbers agree to rounding, not bit for bit (the documented limit of the faiss path)."""
    torch.manual_seed(0)
    x = F.normalize(torch.randn(256, 32), dim=1)
    y = _labels(256, 8, seed=7)
    for metric, distance in (("ip", cosine_distance), ("l2", euclidean_distance)):
        brute, fast = _both_paths(
            lambda distance=distance, **kw: evaluate_retrieval(x, y, x, y, distance, exclude_self=True, nmi=False, **kw),
            index_factory=_flat_factory(metric),
        )
        assert brute.keys() == fast.keys()
        for key in brute:
            assert fast[key] == pytest.approx(brute[key], abs=1e-5), key
        # every ranking difference is a swap of items whose torch distances are within float32 rounding
        d_faiss, ids = _flat_factory(metric)(x).search(x, len(x))
        d_torch = distance(x, x).gather(1, ids)
        ref = stable_topk(distance(x, x), len(x))[0]
        torch.testing.assert_close(d_torch, ref, atol=1e-6, rtol=0)


def test_flat_index_breaks_ties_by_id():
    """k cuts through groups of equal distances: the smallest ids of the group, like stable_topk."""
    db = _int_embeddings(500, 4, seed=8)  # 4 dims in {-2..2}: few distinct distances, big tie groups
    q = _int_embeddings(40, 4, seed=9)
    index = FaissFlatIndex("l2", use_gpu=False)
    index.add(db)
    for k in (1, 5, 37, 500):
        dist, ids = index.search(q, k)
        ref_d, ref_i = stable_topk(euclidean_distance(q, db), k)
        assert torch.equal(ids, ref_i)
        torch.testing.assert_close(dist, ref_d, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- Hamming codes
def _sign_codes(n: int, bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n, bits), generator=g).float() * 2 - 1


def _hamming_factory(codes: torch.Tensor, use_gpu: bool | None = None) -> HammingIndex:
    index = HammingIndex(use_gpu=use_gpu)
    index.add(codes)
    return index


def test_hamming_codes_query_database():
    db, q = _sign_codes(500, 16, seed=10), _sign_codes(70, 16, seed=11)
    y_db, y_q = _labels(500, 4, seed=12), _labels(70, 4, seed=13)
    for topks in [(1, 20, 100), (20, None)]:
        brute, fast = _both_paths(
            lambda topks=topks, **kw: evaluate_hashing(q, y_q, db, y_db, topks=topks, pr_cutoffs=(1, 10, 499), chunk_size=32, **kw)
        )
        assert brute == fast


def test_hamming_codes_query_set_is_gallery():
    x = _sign_codes(300, 8, seed=14)  # 8 bits, 300 codes: many equal codes and distances
    y = _labels(300, 5, seed=15)
    brute, fast = _both_paths(
        lambda **kw: evaluate_retrieval(x, y, x, y, hamming_distance, exclude_self=True, recall_ks=(1, 4), nmi=False,
                                        **kw),
        index_factory=_hamming_factory,
    )
    assert brute == fast


# ----------------------------------------------------------------------------- PQ codes
def _pq_data(seed: int, num_codebooks: int = 2, sub_dim: int = 2):
    """K = 256 (faiss SDC) integer codewords; codes drawn from 6 codewords per sub-space: heavy ties."""
    g = torch.Generator().manual_seed(seed)
    codebooks = torch.randint(-3, 4, (num_codebooks, 256, sub_dim), generator=g).float()
    db = torch.randint(0, 6, (400, num_codebooks), generator=g)
    q = torch.randint(0, 6, (50, num_codebooks), generator=g)
    return codebooks, db, q


def _pq_factory(codebooks: torch.Tensor, mode: str):
    def build(codes: torch.Tensor, use_gpu: bool | None = None) -> PQIndex:
        index = PQIndex(codebooks, mode=mode, backend="faiss")
        index.add(codes)
        return index

    return build


def test_pq_sdc_query_set_is_gallery():
    codebooks, db, _ = _pq_data(seed=16)
    y = _labels(len(db), 5, seed=17)
    distance = lambda a, b: sdc_distance(codebooks, a, b)  # noqa: E731
    brute, fast = _both_paths(
        lambda **kw: evaluate_retrieval(db, y, db, y, distance, exclude_self=True, recall_ks=(1, 4), nmi=False, **kw),
        index_factory=_pq_factory(codebooks, "sdc"),
    )
    assert brute == fast


def test_pq_sdc_and_adc_query_database():
    codebooks, db, q = _pq_data(seed=18)
    y_db, y_q = _labels(len(db), 5, seed=19), _labels(len(q), 5, seed=20)
    sdc = lambda a, b: sdc_distance(codebooks, a, b)  # noqa: E731
    brute, fast = _both_paths(
        lambda **kw: evaluate_query_database(q, y_q, db, y_db, sdc, topks=(3, 40, None), pr_cutoffs=(1, 9), **kw),
        index_factory=_pq_factory(codebooks, "sdc"),
    )
    assert brute == fast
    # ADC: integer query vectors, so the look-up tables are exact in both paths
    q_vec = torch.randint(-3, 4, (50, codebooks.shape[0] * codebooks.shape[2]),
                          generator=torch.Generator().manual_seed(21)).float()
    adc = lambda a, b: adc_distance(codebooks, a, b)  # noqa: E731
    brute, fast = _both_paths(
        lambda **kw: evaluate_query_database(q_vec, y_q, db, y_db, adc, topks=(3, 40), **kw),
        index_factory=_pq_factory(codebooks, "adc"),
    )
    assert brute == fast


def test_pq_index_breaks_ties_by_id():
    codebooks, db, q = _pq_data(seed=22)
    index = PQIndex(codebooks, mode="sdc", backend="faiss")
    index.add(db)
    for k in (1, 7, 60, 400):
        _, ids = index.search(q, k)
        _, ref = stable_topk(sdc_distance(codebooks, q, db), k)
        assert torch.equal(ids, ref)


# ----------------------------------------------------------------------------- rankers and clean metrics
def test_clean_metrics_and_validation_metrics_use_build_index(monkeypatch):
    """A ranker's clean metrics (engine.clean_metrics, the validation RetrievalMetrics) go through
    its build_index above the threshold, with the same numbers."""
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.losses import TripletMarginLoss

    from robust_ranking.evaluation.engine import clean_metrics
    from robust_ranking.lightning_modules import LeNet, MetricRanker

    torch.manual_seed(0)
    for distance in (None, LpDistance(normalize_embeddings=False)):
        loss = TripletMarginLoss(distance=distance) if distance is not None else TripletMarginLoss()
        model = MetricRanker(backbone=LeNet(embedding_dim=16), loss=loss).eval()
        x = _int_embeddings(200, 16, seed=23) if distance is not None else _sign_unit_embeddings(200, 16, seed=23)
        y = _labels(200, 4, seed=24)
        built = []
        original = model.build_index

        def spy(codes, use_gpu=None, built=built, original=original):
            built.append(len(codes))
            return original(codes, use_gpu=use_gpu)

        monkeypatch.setattr(model, "build_index", spy)
        brute = clean_metrics(model, x, y)
        assert built == []
        monkeypatch.setattr(index_module, "FAISS_MIN_GALLERY", 0)
        assert clean_metrics(model, x, y) == brute
        assert built == [200]
        monkeypatch.setattr(index_module, "FAISS_MIN_GALLERY", FAISS_MIN_GALLERY)
