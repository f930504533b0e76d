"""Query / database retrieval metrics of the hashing and quantization literature.

The protocol: a query set ranked against a separate database (no self exclusion); ranking =
ascending distance with ties broken by database index (stable), as in :mod:`retrieval.metrics`.

- ``mAP@topk`` (DCH, HashNet, PQN, SDHA evaluations): ``AP@k = (1 / R_k) sum_{i <= k} P(i) rel(i)``
  with ``R_k`` the number of relevant items among the first ``k`` (``AP = 0`` when ``R_k = 0``);
  ``topk = None`` ranks the whole database (then ``R_k`` is the number of relevant items). This is
  :func:`retrieval.average_precision.average_precision` with ``k=topk``, float32 accumulation.
- precision / recall at ranking cut-offs, averaged over queries (the precision-recall curves).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from robust_ranking.retrieval.average_precision import average_precision, average_precisions, ranked_relevance
from robust_ranking.retrieval.index import RetrievalIndex, query_chunk_rows, search_backend

__all__ = ["average_precision_at_topk", "evaluate_query_database", "map_at_topk", "precision_recall_at_cutoffs"]

Distance = Callable[[Tensor, Tensor], Tensor]


def _sorted_relevance(distances: Tensor, query_labels: Tensor, database_labels: Tensor, topk: int | None) -> Tensor:
    """``[Q, k]`` boolean relevance of each query's ranking by float32 distance (stable on ties), cut at ``topk``."""
    return ranked_relevance(distances.float(), query_labels, database_labels, topk=topk)


def average_precision_at_topk(relevant: Tensor) -> Tensor:
    """Per-query AP over the given (already cut) ranking ``relevant [Q, k]`` -> float32 ``[Q]``.

    ``(1 / R_k) sum_i P(i) rel(i)`` with ``R_k`` the relevant items in the list (0 when there is
    none): :func:`retrieval.average_precision.average_precision` with ``k=None``, float32.
    """
    return average_precision(relevant)


def map_at_topk(distances: Tensor, query_labels: Tensor, database_labels: Tensor, topk: int | None = None) -> float:
    """mAP over the first ``topk`` results (the whole ranking when ``None``) of a ``[Q, N]`` matrix."""
    relevant = _sorted_relevance(distances, query_labels, database_labels, topk)
    return float(average_precision_at_topk(relevant).mean())


def precision_recall_at_cutoffs(
    distances: Tensor, query_labels: Tensor, database_labels: Tensor, cutoffs: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Mean precision and recall over queries at each ranking cut-off -> two ``[len(cutoffs)]`` tensors."""
    relevant = _sorted_relevance(distances, query_labels, database_labels, None)
    return _precision_recall(relevant, None, relevant.shape[1], cutoffs)


def _cutoff_positions(num_n: int, cutoffs: Sequence[int]) -> list[int]:
    return [min(max(int(c), 1), num_n) - 1 for c in cutoffs]


def _precision_recall(
    relevant: Tensor, total: Tensor | None, num_n: int, cutoffs: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Precision / recall at ``cutoffs`` of rankings of ``num_n`` items from their first positions
    ``relevant [Q, n]`` (``n`` past the last cut-off) and each query's relevant count ``total``
    (``None``: ``relevant`` is the whole ranking)."""
    hits = relevant.float().cumsum(dim=1)
    total = hits[:, -1].clamp_min(1.0) if total is None else total.to(hits).clamp_min(1.0)
    idx = torch.tensor(_cutoff_positions(num_n, cutoffs), device=hits.device)
    at = hits[:, idx]
    precision = at / (idx + 1).to(at.dtype)
    recall = at / total[:, None]
    return precision.mean(0), recall.mean(0)


def evaluate_query_database(
    query_codes: Tensor,
    query_labels: Tensor,
    database_codes: Tensor,
    database_labels: Tensor,
    distance: Distance,
    topks: Sequence[int | None] = (None,),
    pr_cutoffs: Sequence[int] = (),
    chunk_size: int = 256,
    index_factory: Callable[..., RetrievalIndex] | None = None,
    faiss_threshold: int | None = None,
) -> dict[str, float | list[float]]:
    """mAP at each ``topk`` (key ``map`` for the whole ranking, ``map@<k>`` otherwise) and, when
    ``pr_cutoffs`` is given, the precision / recall curves (keys ``precision``, ``recall``),
    computed in chunks of queries so memory stays ``O(chunk_size x N)``.

    Large databases: with ``index_factory`` (``index_factory(database_codes, use_gpu=...)`` ->
    a :class:`retrieval.index.RetrievalIndex` ranking like ``distance``, ties by database index)
    and more than ``faiss_threshold`` items (default :data:`retrieval.index.FAISS_MIN_GALLERY`),
    each query chunk is searched for the ``k`` results the metrics need -- the largest ``topk`` and
    cut-off, the whole database when a ``topk`` is ``None`` -- where
    :func:`retrieval.index.search_backend` picks faiss (GPU faiss for CUDA codes and
    ``k <= GPU_MAX_K``); recall denominators come from the label counts. Same metric functions,
    so the same numbers whenever faiss orders the database like ``distance`` does.
    """
    if len(query_codes) == 0:
        raise ValueError("evaluate_query_database needs at least one query")
    sums = {k: 0.0 for k in topks}
    precision = torch.zeros(len(pr_cutoffs))
    recall = torch.zeros(len(pr_cutoffs))
    num_n = len(database_codes)
    if any(k is None for k in topks) or num_n == 0:
        need = num_n
    else:
        need = min(num_n, max([int(k) for k in topks] + [p + 1 for p in _cutoff_positions(num_n, pr_cutoffs)]))
    backend = "torch"
    if index_factory is not None and need > 0:
        backend = search_backend(num_n, need, database_codes.device, faiss_threshold)
    rows = query_chunk_rows(num_n, chunk_size)
    if backend != "torch":
        index = index_factory(database_codes, use_gpu=backend == "faiss-gpu")
        db_labels = database_labels.to(query_labels.device)
        label_values, label_counts = torch.unique(db_labels, return_counts=True)
    for start in range(0, len(query_codes), rows):
        labels = query_labels[start : start + rows]
        if backend == "torch":
            d = distance(query_codes[start : start + rows], database_codes)
            full = _sorted_relevance(d, labels, database_labels, None)
        else:  # the first `need` positions of each ranking, from the index
            _, ids = index.search(query_codes[start : start + rows], need)
            full = db_labels.to(ids.device)[ids] == labels.to(ids.device)[:, None]
        for k, ap in zip(topks, average_precisions(full, list(topks))):  # one pass over the ranking, every cut
            sums[k] += float(ap.sum())
        if pr_cutoffs:
            if backend == "torch":
                p, r = precision_recall_at_cutoffs(d, labels, database_labels, pr_cutoffs)
            else:
                pos = torch.searchsorted(label_values, labels.to(label_values.device)).clamp_max(len(label_values) - 1)
                total = torch.where(label_values[pos] == labels.to(label_values.device), label_counts[pos], 0)
                p, r = _precision_recall(full, total.to(full.device), num_n, pr_cutoffs)
            precision += p.cpu() * len(labels)
            recall += r.cpu() * len(labels)
    n = len(query_codes)
    out: dict[str, float | list[float]] = {("map" if k is None else f"map@{k}"): s / n for k, s in sums.items()}
    if pr_cutoffs:
        out["precision"] = (precision / n).tolist()
        out["recall"] = (recall / n).tolist()
    return out
