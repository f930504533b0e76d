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

from retrieval.average_precision import average_precision, average_precisions, ranked_relevance

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
    relevant = _sorted_relevance(distances, query_labels, database_labels, None).float()
    hits = relevant.cumsum(dim=1)
    total = hits[:, -1].clamp_min(1.0)
    idx = torch.tensor([min(max(int(c), 1), relevant.shape[1]) - 1 for c in cutoffs], device=hits.device)
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
) -> dict[str, float | list[float]]:
    """mAP at each ``topk`` (key ``map`` for the whole ranking, ``map@<k>`` otherwise) and, when
    ``pr_cutoffs`` is given, the precision / recall curves (keys ``precision``, ``recall``),
    computed in chunks of queries so memory stays ``O(chunk_size x N)``."""
    if len(query_codes) == 0:
        raise ValueError("evaluate_query_database needs at least one query")
    sums = {k: 0.0 for k in topks}
    precision = torch.zeros(len(pr_cutoffs))
    recall = torch.zeros(len(pr_cutoffs))
    for start in range(0, len(query_codes), chunk_size):
        d = distance(query_codes[start : start + chunk_size], database_codes)
        labels = query_labels[start : start + chunk_size]
        full = _sorted_relevance(d, labels, database_labels, None)
        for k, ap in zip(topks, average_precisions(full, list(topks))):  # one pass over the ranking, every cut
            sums[k] += float(ap.sum())
        if pr_cutoffs:
            p, r = precision_recall_at_cutoffs(d, labels, database_labels, pr_cutoffs)
            precision += p.cpu() * len(labels)
            recall += r.cpu() * len(labels)
    n = len(query_codes)
    out: dict[str, float | list[float]] = {("map" if k is None else f"map@{k}"): s / n for k, s in sums.items()}
    if pr_cutoffs:
        out["precision"] = (precision / n).tolist()
        out["recall"] = (recall / n).tolist()
    return out
