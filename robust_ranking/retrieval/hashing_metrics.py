"""Hamming-space retrieval metrics of the deep hashing literature (DCH, HashNet, SDHA).

Codes are the ``{-1, +1}`` sign codes of :meth:`lightning_modules.DCHRanker.encode` (float),
or their packed form (``uint8 [N, K / 8]``, bit order of ``numpy.packbits``: first bit = most
significant bit of the first byte, ``1`` <-> ``+1``). Rankings sort by Hamming distance, ties
broken by database index (stable), as everywhere in :mod:`retrieval`.

- ``mAP@topk`` / mAP over the whole ranking: :mod:`retrieval.topk_metrics` (not re-implemented).
- ``mAP@H<=r`` (DCH Sec. 4, "MAP@H<=2"): the AP of the list of database items within Hamming
  radius ``r`` of the query, ranked by distance; a query that retrieves no relevant item in the
  ball scores 0 (:func:`retrieval.average_precision.average_precision`, ``k=None``, on the
  relevance masked to the ball, float32).
- precision / recall within Hamming radius ``r`` for ``r = 0..K`` (the hashing PR curve), and
  precision within radius 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from robust_ranking.retrieval.average_precision import average_precision
from robust_ranking.retrieval.index import query_chunk_rows
from robust_ranking.retrieval.topk_metrics import evaluate_query_database

__all__ = [
    "evaluate_hashing",
    "hamming_distance",
    "hamming_pr_curve",
    "map_within_hamming_radius",
    "pack_codes",
    "packed_hamming_distance",
    "sign_codes",
    "unpack_codes",
]

# popcount of every byte value
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int16)
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def sign_codes(x: Tensor) -> Tensor:
    """``sgn`` of SDHA Sec. 3: ``+1`` where ``x > 0``, ``-1`` otherwise (zero maps to ``-1``), as ``x``'s dtype."""
    return torch.where(x > 0, 1.0, -1.0).to(x.dtype if x.is_floating_point() else torch.float32)


def hamming_distance(a: Tensor, b: Tensor) -> Tensor:
    """Hamming distance between ``{-1, 1}`` codes, ``[..., A, K] x [..., B, K] -> [..., A, B]``.

    ``(K - <a, b>) / 2``: one matrix product, exact in float32 for ``K < 2^24``. On the tanh
    relaxation it is the usual inner-product surrogate (SDHA's ``d_inner``), differentiable.
    """
    return 0.5 * (a.shape[-1] - a @ b.transpose(-1, -2))


def pack_codes(codes: Tensor) -> Tensor:
    """``[N, K]`` codes (``> 0`` = bit 1: ``{-1, 1}``, ``{0, 1}`` or bool) -> ``uint8 [N, K / 8]``."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be [N, K], got shape {tuple(codes.shape)}")
    n, k = codes.shape
    if k % 8:
        raise ValueError(f"packed binary codes need a code length divisible by 8, got {k} bits")
    bits = (codes > 0).to(torch.uint8).view(n, k // 8, 8)
    return (bits * _BIT_WEIGHTS.to(codes.device)).sum(-1, dtype=torch.uint8)


def unpack_codes(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_codes`: ``uint8 [N, K / 8] -> float {-1, 1} [N, K]``."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8 [N, K/8], got {packed.dtype} {tuple(packed.shape)}")
    bits = (packed[..., None] & _BIT_WEIGHTS.to(packed.device)) > 0
    return torch.where(bits, 1.0, -1.0).flatten(1)


def packed_hamming_distance(a: Tensor, b: Tensor, chunk_size: int = 256) -> Tensor:
    """Hamming distances between packed codes ``uint8 [A, W] x [B, W] -> int64 [A, B]`` (XOR + popcount)."""
    if a.dtype != torch.uint8 or b.dtype != torch.uint8 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError("packed_hamming_distance needs uint8 [A, W] and [B, W] codes of the same width")
    table = _POPCOUNT.to(a.device)
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.int64, device=a.device)
    for start in range(0, a.shape[0], chunk_size):  # bounds the [chunk, B, W] XOR temporary
        x = torch.bitwise_xor(a[start : start + chunk_size, None, :], b[None, :, :])
        out[start : start + chunk_size] = table[x.long()].sum(-1)
    return out


def map_within_hamming_radius(
    distances: Tensor, query_labels: Tensor, database_labels: Tensor, radius: int = 2
) -> Tensor:
    """Per-query AP of the items within Hamming ``radius`` (``[Q, N]`` distances -> ``[Q]``).

    The ball is ranked by distance with ties in database order; ``AP = (1 / R) sum P(i) rel(i)``
    over it, ``R`` the relevant items in the ball; 0 when the ball holds no relevant item.
    """
    order = torch.sort(distances.float(), dim=1, stable=True)
    inside = order.values <= radius + 1e-6
    relevant = (database_labels.to(order.indices.device)[order.indices]
                == query_labels.to(order.indices.device)[:, None]) & inside
    return average_precision(relevant)


def hamming_pr_curve(
    distances: Tensor, query_labels: Tensor, database_labels: Tensor, num_bits: int
) -> tuple[Tensor, Tensor]:
    """Mean precision and recall of retrieving every item within radius ``r``, ``r = 0..num_bits``.

    Precision of a query whose ball is empty counts 0 (the convention of the DCH / HashNet
    evaluation code). Returns two ``[num_bits + 1]`` tensors.
    """
    d = distances.round().long().clamp(0, num_bits)
    relevant = database_labels.to(d.device)[None, :] == query_labels.to(d.device)[:, None]
    radii = num_bits + 1
    # Histograms of distances per query, of all items and of the relevant ones, then cumulate.
    retrieved = torch.zeros(d.shape[0], radii, device=d.device).scatter_add_(1, d, torch.ones_like(d, dtype=torch.float))
    hits = torch.zeros(d.shape[0], radii, device=d.device).scatter_add_(1, d, relevant.float())
    retrieved, hits = retrieved.cumsum(1), hits.cumsum(1)
    precision = torch.where(retrieved > 0, hits / retrieved.clamp_min(1), torch.zeros_like(hits))
    recall = hits / relevant.sum(1, keepdim=True).clamp_min(1)
    return precision.mean(0), recall.mean(0)


def evaluate_hashing(
    query_codes: Tensor,
    query_labels: Tensor,
    database_codes: Tensor,
    database_labels: Tensor,
    topks: Sequence[int | None] = (1000, None),
    radius: int = 2,
    pr_cutoffs: Sequence[int] = (),
    chunk_size: int = 256,
    faiss_threshold: int | None = None,
) -> dict[str, float | list[float]]:
    """Clean Hamming retrieval metrics of ``{-1, 1}`` query codes against a database.

    Keys: ``map@<k>`` / ``map`` (:func:`retrieval.topk_metrics.evaluate_query_database`),
    ``map@H<=<radius>``, ``precision@H<=<radius>``, and the curves ``pr_radius_precision`` /
    ``pr_radius_recall`` (radius 0..K) plus, with ``pr_cutoffs``, ``precision`` / ``recall`` at
    those ranking cut-offs. Computed in chunks of queries (memory ``O(chunk_size x N)``).

    Databases of more than ``faiss_threshold`` codes (default
    :data:`retrieval.index.FAISS_MIN_GALLERY`) rank the ``map@<k>`` / ``map`` / cut-off metrics
    through a :class:`retrieval.hamming_index.HammingIndex` (faiss ``IndexBinaryFlat``, GPU faiss
    for CUDA codes and ``k <= GPU_MAX_K``, ties by database index): Hamming distances are
    integers, so the numbers are exactly those of the torch path. The radius metrics stay torch
    (a histogram / ball per query, in chunks of at most ``MAX_BLOCK_ELEMENTS`` entries).
    """
    from robust_ranking.retrieval.hamming_index import HammingIndex  # lazy: hamming_index imports this module

    def hamming_index(codes: Tensor, use_gpu: bool = False) -> HammingIndex:
        index = HammingIndex(use_gpu=use_gpu)
        index.add(codes)
        return index

    out = evaluate_query_database(query_codes, query_labels, database_codes, database_labels, hamming_distance,
                                  topks=topks, pr_cutoffs=pr_cutoffs, chunk_size=chunk_size,
                                  index_factory=hamming_index, faiss_threshold=faiss_threshold)
    k = query_codes.shape[1]
    ap_sum, prec_sum = 0.0, 0.0
    pr_p, pr_r = torch.zeros(k + 1), torch.zeros(k + 1)
    rows = query_chunk_rows(len(database_codes), chunk_size)
    for start in range(0, len(query_codes), rows):
        d = hamming_distance(query_codes[start : start + rows], database_codes)
        labels = query_labels[start : start + rows]
        ap_sum += float(map_within_hamming_radius(d, labels, database_labels, radius).sum())
        p, r = hamming_pr_curve(d, labels, database_labels, k)
        pr_p += p.cpu() * len(labels)
        pr_r += r.cpu() * len(labels)
        prec_sum += float(p[min(radius, k)]) * len(labels)
    n = len(query_codes)
    out[f"map@H<={radius}"] = ap_sum / n
    out[f"precision@H<={radius}"] = prec_sum / n
    out["pr_radius_precision"] = (pr_p / n).tolist()
    out["pr_radius_recall"] = (pr_r / n).tolist()
    return out
