"""Functional retrieval metrics: Recall@k, mAP, MAP@R, NMI.

Conventions shared by every function here:

- ``distances`` is a ``[Q, N]`` matrix (or a ``distance(a, b) -> [A, B]`` callable), smaller
  means closer.
- A query's ranking is its gallery sorted by ascending distance, ties broken by gallery index
  (a stable sort), so results are deterministic and identical on CPU and CUDA.
- Relevance means "same label".
- ``exclude_self=True`` is for the usual "query set = gallery" protocol: query ``i`` is gallery
  item ``i`` and is removed from its own ranking (ranks are counted as if it were absent).
- Queries without any relevant gallery item contribute 0 to mAP and MAP@R (and a miss to
  Recall@k) instead of being dropped, so the denominator is always the number of queries.

Average precision itself (mAP: ``k=None``, MAP@R: ``k="R"``, accumulated in float64) and the
stable ranking come from :mod:`retrieval.average_precision`. The class wrapper
:class:`RetrievalMetrics` (a ``torchmetrics.Metric``) lives in :mod:`retrieval.retrieval_metrics`,
which imports this module; this module never imports it (import it from there or from
:mod:`retrieval`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from robust_ranking.retrieval.average_precision import average_precisions, stable_ranking
from robust_ranking.retrieval.index import RetrievalIndex, index_search_chunks, query_chunk_rows, search_backend

__all__ = [
    "deduplicate_by_index",
    "evaluate_retrieval",
    "kmeans_nmi",
    "map_at_r",
    "mean_average_precision",
    "normalized_mutual_info",
    "rank_gallery",
    "recall_at_k",
]

DistanceFn = Callable[[Tensor, Tensor], Tensor]
#: ``index_factory(gallery_codes, use_gpu) -> RetrievalIndex`` holding those codes, ranking like
#: ``distance`` (a ranker's ``build_index``): the index of the faiss path for large galleries.
IndexFactory = Callable[..., RetrievalIndex]


# --------------------------------------------------------------------------- ranking helpers
def rank_gallery(distances: Tensor, exclude: Tensor | None = None) -> Tensor:
    """Gallery indices of every query's ranking, closest first, ties broken by gallery index.

    Args:
        distances: ``[Q, N]`` distances (smaller is closer).
        exclude: optional ``[Q, N]`` boolean mask of entries to drop from the rankings; every row
            must drop the same number ``E`` of entries (e.g. exactly one for self exclusion).

    Returns:
        ``[Q, N - E]`` long tensor of gallery indices.
    """
    if distances.dim() != 2:
        raise ValueError(f"distances must be [Q, N], got shape {tuple(distances.shape)}")
    order = torch.sort(distances, dim=1, stable=True).indices
    if exclude is None:
        return order
    if exclude.shape != distances.shape:
        raise ValueError("exclude must have the same shape as distances")
    num_q, num_n = distances.shape
    per_row = exclude.sum(dim=1)
    if num_q and not bool((per_row == per_row[0]).all()):
        raise ValueError("exclude must drop the same number of entries from every row")
    num_excluded = int(per_row[0]) if num_q else 0
    keep = ~exclude.gather(1, order)
    # Boolean indexing keeps row-major order, so each row keeps its ranking order.
    return order[keep].view(num_q, num_n - num_excluded)


def _rank_chunk(distances: Tensor, self_offset: int | None) -> Tensor:
    """Ranking of a chunk of queries; with ``self_offset`` query ``j`` of the chunk is gallery
    item ``self_offset + j`` and is removed from its row."""
    if self_offset is None:
        return stable_ranking(distances)
    self_idx = torch.arange(distances.shape[0], device=distances.device) + self_offset
    return stable_ranking(distances, exclude_index=self_idx)


def _relevance_stats(relevant: Tensor, ks: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Per-query statistics of a ``[C, N']`` boolean relevance matrix in ranking order.

    Returns ``(hits [C, len(ks)] bool, ap [C] float64, ap_at_r [C] float64)``: Recall@k hits, AP
    over the whole ranking and AP@R (:func:`retrieval.average_precision.average_precision` with
    ``k=None`` and ``k="R"``, float64 accumulation).
    """
    num_q, num_n = relevant.shape
    device = relevant.device
    if num_n == 0:  # empty ranking (e.g. a one-item gallery with self exclusion)
        zeros = torch.zeros(num_q, dtype=torch.float64, device=device)
        return torch.zeros(num_q, len(ks), dtype=torch.bool, device=device), zeros, zeros.clone()

    # 0-based rank of the first hit (argmax returns the first maximum); pushed past every k when
    # there is no relevant item (a k larger than N' must not count it as a hit).
    first_hit = torch.where(relevant.any(dim=1), relevant.to(torch.uint8).argmax(dim=1),
                            torch.iinfo(torch.int64).max)
    hits = first_hit[:, None] < torch.as_tensor(list(ks), device=device)[None, :]
    ap, ap_at_r = average_precisions(relevant, (None, "R"), dtype=torch.float64)
    return hits, ap, ap_at_r


def _rank_chunks(distance_chunks: Iterable[tuple[int, Tensor]], exclude_self: bool) -> Iterator[tuple[int, Tensor]]:
    """``(start, ranking)`` of ``(start, distances[start:start + C])`` chunks (the torch path)."""
    for start, dist in distance_chunks:
        order = _rank_chunk(dist, start if exclude_self else None)
        del dist  # the chunk's distances are no longer needed; keep peak memory ~ C x N
        yield start, order


def _index_rankings(
    index: RetrievalIndex, query_codes: Tensor, num_n: int, exclude_self: bool, rows: int
) -> Iterator[tuple[int, Tensor]]:
    """``(start, ranking)`` chunks from an index searched with ``k = N`` (the faiss path): the
    whole ranking, ties by gallery index; with ``exclude_self`` query ``i``'s own id ``i`` is
    removed from its row (ranks counted as if it were absent, as in :func:`_rank_chunk`)."""
    for start, _, ids in index_search_chunks(index, query_codes, num_n, rows):
        if exclude_self:
            self_idx = torch.arange(ids.shape[0], device=ids.device) + start
            ids = ids[ids != self_idx[:, None]].view(ids.shape[0], num_n - 1)
        yield start, ids


def _accumulate(
    rankings: Iterable[tuple[int, Tensor]],
    query_labels: Tensor,
    gallery_labels: Tensor,
    ks: Sequence[int],
) -> dict[str, Any]:
    """Sum per-query statistics over ``(start, rankings of queries start..start + C)`` chunks.

    Sums stay on the device and are read back once at the end (no per-query host transfers).
    """
    hit_sum: Tensor | None = None
    ap_sum = ap_r_sum = None
    count = 0
    for start, order in rankings:
        q_lab = query_labels[start : start + order.shape[0]].to(order.device)
        relevant = gallery_labels.to(order.device)[order] == q_lab[:, None]
        hits, ap, ap_r = _relevance_stats(relevant, ks)
        if hit_sum is None:
            hit_sum, ap_sum, ap_r_sum = hits.sum(0), ap.sum(), ap_r.sum()
        else:
            hit_sum, ap_sum, ap_r_sum = hit_sum + hits.sum(0), ap_sum + ap.sum(), ap_r_sum + ap_r.sum()
        count += order.shape[0]
    if count == 0:
        raise ValueError("retrieval metrics need at least one query")
    assert hit_sum is not None and ap_sum is not None and ap_r_sum is not None
    hit_list = hit_sum.tolist()
    return {
        "recall": {k: hit_list[i] / count for i, k in enumerate(ks)},
        "map": float(ap_sum) / count,
        "map@r": float(ap_r_sum) / count,
    }


def _check_inputs(
    num_q: int, num_n: int, query_labels: Tensor, gallery_labels: Tensor, exclude_self: bool
) -> None:
    if query_labels.shape != (num_q,):
        raise ValueError(f"query_labels must have shape ({num_q},), got {tuple(query_labels.shape)}")
    if gallery_labels.shape != (num_n,):
        raise ValueError(f"gallery_labels must have shape ({num_n},), got {tuple(gallery_labels.shape)}")
    if exclude_self and num_q != num_n:
        raise ValueError(f"exclude_self needs query set = gallery, got {num_q} queries and {num_n} items")


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"recall ks must be >= 1, got {ks}")
    return ks


def _matrix_chunks(distances: Tensor, chunk_size: int) -> Iterable[tuple[int, Tensor]]:
    for start in range(0, distances.shape[0], chunk_size):
        yield start, distances[start : start + chunk_size]


def _stats_from_matrix(
    distances: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    exclude_self: bool,
    ks: Sequence[int] = (1,),
    chunk_size: int = 1024,
) -> dict[str, Any]:
    if distances.dim() != 2:
        raise ValueError(f"distances must be [Q, N], got shape {tuple(distances.shape)}")
    _check_inputs(distances.shape[0], distances.shape[1], query_labels, gallery_labels, exclude_self)
    # Chunking bounds the memory of the sort / relevance temporaries even for a full matrix.
    return _accumulate(_rank_chunks(_matrix_chunks(distances, chunk_size), exclude_self), query_labels, gallery_labels, ks)


# --------------------------------------------------------------------------- ranking metrics
def recall_at_k(
    distances: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    ks: Sequence[int],
    exclude_self: bool = False,
) -> dict[int, float]:
    """Recall@k: fraction of queries with at least one relevant item among their first ``k``.

    A ``k`` larger than the ranking length counts the whole ranking.
    """
    ks = _check_ks(ks)
    return _stats_from_matrix(distances, query_labels, gallery_labels, exclude_self, ks)["recall"]


def mean_average_precision(
    distances: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    exclude_self: bool = False,
) -> float:
    """Mean over queries of the average precision over the whole ranking,
    ``AP = (1 / R) * sum_i P(i) * rel(i)`` with ``R`` the number of relevant items.

    Queries without any relevant item contribute an AP of 0.
    """
    return _stats_from_matrix(distances, query_labels, gallery_labels, exclude_self)["map"]


def map_at_r(
    distances: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    exclude_self: bool = False,
) -> float:
    """MAP@R (Musgrave et al., "A Metric Learning Reality Check", 2020).

    With ``R`` the number of relevant items of a query, ``AP@R = (1 / R) * sum_{i <= R} P(i) *
    rel(i)``; averaged over queries. Queries without any relevant item contribute 0.
    """
    return _stats_from_matrix(distances, query_labels, gallery_labels, exclude_self)["map@r"]


# --------------------------------------------------------------------------- clustering metrics
def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).reshape(-1)


def _entropy(counts: np.ndarray, total: float) -> float:
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def normalized_mutual_info(labels_true: Tensor | Sequence[Any], labels_pred: Tensor | Sequence[Any]) -> float:
    """Normalized mutual information ``MI / mean(H(true), H(pred))`` (arithmetic-mean
    normalization, natural log), matching ``sklearn.metrics.normalized_mutual_info_score``
    including its limit cases (both labelings trivial -> 1, zero MI -> 0)."""
    t = _as_numpy(labels_true)
    p = _as_numpy(labels_pred)
    if t.shape != p.shape:
        raise ValueError(f"label arrays differ in length: {t.shape[0]} vs {p.shape[0]}")
    classes, t_idx = np.unique(t, return_inverse=True)
    clusters, p_idx = np.unique(p, return_inverse=True)
    if len(classes) == len(clusters) and len(classes) <= 1:
        # Neither labeling splits the data: a perfect (if uninformative) match, as in sklearn.
        return 1.0
    if len(classes) == 1 or len(clusters) == 1:
        return 0.0  # one side has zero entropy, so MI = 0
    n = float(t.shape[0])
    # Sparse contingency table: only the non-empty (class, cluster) cells, so memory stays
    # O(samples) even with thousands of classes and clusters.
    cells, n_ij = np.unique(t_idx.astype(np.int64) * len(clusters) + p_idx, return_counts=True)
    a = np.bincount(t_idx, minlength=len(classes)).astype(np.float64)
    b = np.bincount(p_idx, minlength=len(clusters)).astype(np.float64)
    a_i = a[cells // len(clusters)]
    b_j = b[cells % len(clusters)]
    n_ij = n_ij.astype(np.float64)
    mi = float((n_ij / n * (np.log(n_ij) + math.log(n) - np.log(a_i) - np.log(b_j))).sum())
    mi = max(mi, 0.0)  # round-off can make an independent pair slightly negative
    if mi <= np.finfo(np.float64).eps:
        return 0.0
    normalizer = 0.5 * (_entropy(a, n) + _entropy(b, n))
    return float(mi / normalizer)


def _kmeans_pp_init(x: Tensor, k: int, seed: int) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007) on ``x``'s device.

    Why: faiss initializes with k random points, which on well-separated classes routinely puts
    two centroids in one class and leaves another without any (Lloyd iterations never recover),
    so NMI would measure the initialization more than the embedding. The loop is over the k
    centroids (each step vectorized over all points); the uniforms come from a seeded CPU
    generator so the seeding is deterministic.
    """
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    uniforms = torch.rand(k, generator=gen, dtype=torch.float64).to(x.device)
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centroids[0] = x[first]
    min_sq = ((x - centroids[0]) ** 2).sum(dim=1).to(torch.float64)
    for c in range(1, k):
        # Sample the next centroid with probability proportional to the squared distance to
        # the closest chosen one (inverse CDF; stays on the device, no host sync).
        cdf = min_sq.cumsum(0)
        pick = torch.searchsorted(cdf, (uniforms[c] * cdf[-1]).reshape(1), right=True).clamp_max(n - 1)
        centroids[c] = x[pick[0]]
        min_sq = torch.minimum(min_sq, ((x - centroids[c]) ** 2).sum(dim=1).to(torch.float64))
    return centroids


def kmeans_nmi(
    embeddings: Tensor,
    labels: Tensor,
    num_clusters: int | None = None,
    seed: int = 0,
    niter: int = 20,
) -> float:
    """NMI between ``labels`` and a k-means clustering of ``embeddings``.

    ``num_clusters`` defaults to the number of distinct labels. Lloyd iterations run in faiss
    (CPU, exact assignment) from a seeded k-means++ initialization, on every point (no faiss
    subsampling), so the result depends only on the data and ``seed``.
    """
    import faiss  # local import: the ranking metrics do not need faiss

    emb = embeddings.detach().to(torch.float32)
    if emb.dim() != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {tuple(emb.shape)}")
    y = _as_numpy(labels)
    n, dim = emb.shape
    k = int(num_clusters) if num_clusters is not None else len(np.unique(y))
    k = min(k, n)
    if k <= 1:
        return normalized_mutual_info(y, np.zeros(n, dtype=np.int64))
    init = np.ascontiguousarray(_kmeans_pp_init(emb, k, seed).cpu().numpy())
    x = np.ascontiguousarray(emb.cpu().numpy())
    km = faiss.Kmeans(
        dim,
        k,
        niter=niter,
        seed=seed,
        verbose=False,
        min_points_per_centroid=1,  # silences faiss's "too few points" warning on small sets
        max_points_per_centroid=(n + k - 1) // k + 1,  # train on every point, no subsampling
    )
    km.train(x, init_centroids=init)
    _, assign = km.index.search(x, 1)
    return normalized_mutual_info(y, assign.reshape(-1))


# --------------------------------------------------------------------------- all-in-one
def evaluate_retrieval(
    query_codes: Tensor,
    query_labels: Tensor,
    gallery_codes: Tensor,
    gallery_labels: Tensor,
    distance: DistanceFn,
    exclude_self: bool = False,
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    chunk_size: int = 1024,
    nmi: bool = True,
    index_factory: IndexFactory | None = None,
    faiss_threshold: int | None = None,
) -> dict[str, float]:
    """Recall@k, mAP, MAP@R (and NMI) of ``query_codes`` against ``gallery_codes``.

    Distances are computed ``chunk_size`` queries at a time (fewer when ``chunk_size x N`` would
    exceed :data:`retrieval.index.MAX_BLOCK_ELEMENTS`), so the full ``Q x N`` matrix never exists.

    Index path: with ``index_factory`` (``index_factory(gallery_codes, use_gpu=...)``, e.g. a
    ranker's ``build_index``), each query chunk's whole ranking comes from
    ``index.search(chunk, k=N)`` (faiss, ties broken by gallery index) when
    :func:`retrieval.index.search_backend` picks faiss for ``k = N``: a gallery above
    ``faiss_threshold`` (default :data:`retrieval.index.FAISS_MIN_GALLERY`) yet with
    ``N <= GPU_MAX_K`` -- i.e. only when the threshold is lowered: mAP needs the whole ranking, which
    the torch sort serves faster (docs/evaluation.md, "Large galleries and GPU faiss"). The numbers
    equal the torch path's whenever the two distance computations order the gallery alike (always
    for Hamming / equal codes; float distances may differ in the last bit).

    Returns a dict with keys ``recall@<k>`` for each ``k`` in ``recall_ks``, ``map``, ``map@r``
    and ``nmi`` (k-means NMI of the gallery codes vs the gallery labels; omitted when
    ``nmi=False`` or when the codes are not floating point, e.g. PQ or packed binary codes).

    If a floating-point code is NaN / inf, every value is NaN (with a warning): a ranking of NaN
    distances would still produce numbers, and they would mean nothing.
    """
    ks = _check_ks(recall_ks)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    num_q, num_n = query_codes.shape[0], gallery_codes.shape[0]
    _check_inputs(num_q, num_n, query_labels, gallery_labels, exclude_self)
    bad = sum(int((~torch.isfinite(c.flatten(1))).any(dim=1).sum()) for c in (query_codes, gallery_codes)
              if c.is_floating_point())
    if bad:
        warnings.warn(f"{bad} query / gallery codes are NaN / inf: every retrieval metric is NaN", stacklevel=2)
        keys = [f"recall@{k}" for k in ks] + ["map", "map@r"]
        keys += ["nmi"] if nmi and gallery_codes.is_floating_point() else []
        return {key: math.nan for key in keys}

    rows = query_chunk_rows(num_n, chunk_size)

    def chunks() -> Iterable[tuple[int, Tensor]]:
        for start in range(0, num_q, rows):
            yield start, distance(query_codes[start : start + rows], gallery_codes)

    backend = "torch"
    if index_factory is not None and num_n > 0:
        backend = search_backend(num_n, num_n, gallery_codes.device, faiss_threshold)  # mAP: k = N
    with torch.no_grad():
        if backend == "torch":
            rankings = _rank_chunks(chunks(), exclude_self)
        else:
            index = index_factory(gallery_codes, use_gpu=backend == "faiss-gpu")
            rankings = _index_rankings(index, query_codes, num_n, exclude_self, rows)
        stats = _accumulate(rankings, query_labels, gallery_labels, ks)
    out: dict[str, float] = {f"recall@{k}": v for k, v in stats["recall"].items()}
    out["map"] = stats["map"]
    out["map@r"] = stats["map@r"]
    if nmi and gallery_codes.is_floating_point():
        out["nmi"] = kmeans_nmi(gallery_codes, gallery_labels)
    return out


def deduplicate_by_index(indices: Tensor, *values: Tensor) -> tuple[Tensor, ...]:
    """Sort by sample index and keep one entry per index (the first one fed).

    A ``DistributedSampler`` pads the last batch with repeated samples; dropping them and
    sorting makes gathered multi-process states equal to the single-process state.

    Returns ``(unique_sorted_indices, *values_in_the_same_order)``.
    """
    indices = indices.reshape(-1)
    order = torch.argsort(indices, stable=True)
    sorted_idx = indices[order]
    first = torch.ones_like(sorted_idx, dtype=torch.bool)
    first[1:] = sorted_idx[1:] != sorted_idx[:-1]
    keep = order[first]
    return (indices[keep], *(v[keep.to(v.device)] for v in values))
