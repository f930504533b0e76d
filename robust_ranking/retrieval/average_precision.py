"""Average precision from ranked relevance: the one implementation every metric and attack calls.

Small pure functions on tensors, in the style of ``torchmetrics.functional``: no state, no
dependence on any other module of :mod:`retrieval` (the metric modules and the attacks import this
one, never the other way round).

Ranking (:func:`stable_ranking`, :func:`ranked_relevance`): a query's ranking is the database
sorted by ascending distance, **ties broken by database index** (a stable sort), so results are
deterministic and identical on CPU and CUDA; optionally each query's own database entry is removed
(the "query set = gallery" protocol). Relevance means "same label".

Average precision (:func:`average_precision`) of a ranked relevance list ``rel(1..n)``, with
``P(i) = (# relevant among the first i) / i``. One formula, three cut-offs, named by ``k``:

- ``k=None`` -- ``AP = (1 / R) sum_{i <= n} P(i) rel(i)``, ``R`` = relevant items in the list: the
  non-interpolated AP of TREC (Manning, Raghavan & Schuetze, *Introduction to Information
  Retrieval*, 2008, Sec. 8.4). The mAP of deep metric learning's "query set = gallery" protocol
  (:func:`retrieval.metrics.mean_average_precision`), of UAP-IR (Li et al., "Universal Perturbation
  Attack Against Image Retrieval", ICCV 2019) and of PQ-AG (Feng et al., AAAI 2020) by default.
- ``k=<int>`` -- ``AP@k = (1 / R_k) sum_{i <= k} P(i) rel(i)``, ``R_k`` = relevant items among the
  first ``k`` (**not** ``R``, and not ``min(R, k)``): the mAP@topk of the deep hashing /
  quantization literature (HashNet, Cao et al., ICCV 2017; DCH, Cao et al., CVPR 2018; PQN, Yu et
  al., 2018; the SDHA / HAG / DHTA attack evaluations), i.e. the ``sum(P * imatch) / relevant_num``
  over the first ``R = topk`` results of those papers' released ``mean_average_precision`` scripts.
- ``k="R"`` -- ``AP@R = (1 / R) sum_{i <= R} P(i) rel(i)``, cut at the query's own ``R``: MAP@R of
  Musgrave, Belongie & Lim, "A Metric Learning Reality Check", ECCV 2020.

``k=int`` is exactly ``k=None`` applied to ``relevant[:, :k]`` (an already cut list -- e.g. the
output of :func:`retrieval.index.stable_topk` -- is scored with ``k=None``); the AP inside a Hamming
ball (DCH's mAP@H<=r) is ``k=None`` on the relevance masked to the ball. A query whose list holds
no relevant item (``R = 0`` / ``R_k = 0``) scores 0: it is averaged in, never dropped.

Numerics -- also an explicit argument, because two accumulations are in use and each must keep its
numbers bit for bit: every term ``P(i) rel(i)`` is computed in float32 (cumulative hit counts are
exact integers), then the sum over the list and the division by ``R`` run in ``dtype``:

- ``torch.float32`` (default): the query / database metrics (:mod:`retrieval.topk_metrics`,
  :mod:`retrieval.hashing_metrics`) and the attacks (PQ-AG, UAP-IR, SDHA / HAG / DHTA);
- ``torch.float64``: :mod:`retrieval.metrics` (``evaluate_retrieval``: mAP and MAP@R).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["APCutoff", "average_precision", "average_precisions", "ranked_relevance", "stable_ranking"]

APCutoff = int | Literal["R"] | None
"""The cut-off ``k`` of :func:`average_precision`: ``None`` (whole list), an ``int`` (AP@k) or ``"R"`` (AP@R)."""


# --------------------------------------------------------------------------- ranking
def stable_ranking(distances: Tensor, exclude_index: Tensor | None = None) -> Tensor:
    """Database indices of every query's ranking, closest first, ties broken by database index.

    Args:
        distances: ``[Q, N]`` distances, smaller is closer. Sorted as given: a caller that ranks
            by float32 distances casts first (a cast can create ties).
        exclude_index: optional ``[Q]`` database index of each query's own entry, removed from its
            row (the "query set = gallery" protocol; ranks are counted as if it were absent).

    Returns:
        ``[Q, N]`` (``[Q, N - 1]`` with ``exclude_index``) long tensor.
    """
    if distances.dim() != 2:
        raise ValueError(f"distances must be [Q, N], got shape {tuple(distances.shape)}")
    if exclude_index is None:
        return torch.sort(distances, dim=1, stable=True).indices
    num_q, num_n = distances.shape
    rows = torch.arange(num_q, device=distances.device)
    self_idx = exclude_index.to(device=distances.device, dtype=torch.long).reshape(-1)
    if self_idx.shape != (num_q,):
        raise ValueError(f"exclude_index must be [Q={num_q}], got shape {tuple(exclude_index.shape)}")
    # Push the self entry to +inf (out of place: the distances may be a view of the caller's
    # matrix) so the stable sort usually puts it last and dropping the last column removes it.
    # Moving one entry does not change the stable order of the others, so this equals a plain
    # sort followed by removing the self entry.
    pushed = distances.index_put((rows, self_idx), torch.tensor(float("inf"), device=distances.device))
    order = torch.sort(pushed, dim=1, stable=True).indices
    if bool((order[:, -1] == self_idx).all()):
        return order[:, :-1]
    # Some row has other +inf (or NaN) entries after the self entry: remove it by a mask instead
    # (boolean indexing keeps row-major order, so each row keeps its ranking order).
    keep = order != self_idx[:, None]
    return order[keep].view(num_q, num_n - 1)


def ranked_relevance(
    distances: Tensor,
    query_labels: Tensor,
    database_labels: Tensor,
    topk: int | None = None,
    exclude_index: Tensor | None = None,
) -> Tensor:
    """``[Q, n]`` boolean relevance ("same label") of each query's :func:`stable_ranking`.

    ``exclude_index`` removes each query's own entry first; ``topk`` then keeps the first ``topk``
    positions (``n = min(topk, N')``; ``None`` keeps the whole ranking). The result is on the
    distances' device.
    """
    order = stable_ranking(distances, exclude_index)
    if topk is not None:
        order = order[:, :topk]
    return database_labels.to(order.device)[order] == query_labels.to(order.device)[:, None]


# --------------------------------------------------------------------------- average precision
def _check_cutoff(k: APCutoff) -> None:
    if k is None or k == "R":
        return
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be None, 'R' or an integer >= 1, got {k!r}")


def average_precisions(
    relevant: Tensor, ks: Sequence[APCutoff], *, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, ...]:
    """:func:`average_precision` for each cut-off in ``ks``, sharing one pass over the list.

    Returns one ``[Q]`` tensor of ``dtype`` per entry of ``ks``, in order (bit-identical to
    calling :func:`average_precision` once per cut-off).
    """
    if relevant.dim() != 2:
        raise ValueError(f"relevant must be [Q, n], got shape {tuple(relevant.shape)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    for k in ks:
        _check_cutoff(k)
    if relevant.dtype != torch.bool:
        relevant = relevant != 0
    num_q, num_n = relevant.shape
    if num_n == 0:  # an empty list (e.g. a one-item gallery with self exclusion) holds nothing relevant
        return tuple(torch.zeros(num_q, dtype=dtype, device=relevant.device) for _ in ks)

    # Terms P(i) rel(i) in float32 (hit counts are exact integers below 2^24), sums in `dtype`.
    cum = relevant.cumsum(dim=1, dtype=torch.int32)  # relevant items among the first i
    ranks = torch.arange(1, num_n + 1, device=relevant.device, dtype=torch.float32)
    terms = torch.where(relevant, cum.to(torch.float32) / ranks, 0.0)
    num_rel = cum[:, -1]  # R: relevant items in the whole list
    denom = num_rel.clamp(min=1).to(dtype)

    out = []
    for k in ks:
        if k is None:  # the whole list, normalized by R
            out.append(terms.sum(dim=1, dtype=dtype) / denom)
        elif k == "R":  # cut at the query's R, normalized by R (MAP@R)
            within_r = ranks[None, :] <= num_rel[:, None]
            out.append((terms * within_r).sum(dim=1, dtype=dtype) / denom)
        else:  # cut at k, normalized by R_k, the relevant items among the first k
            n = min(int(k), num_n)
            # .contiguous(): the same memory layout (hence summation order) as a list cut before
            # the call, so AP@k is bit-identical to k=None on relevant[:, :k].
            out.append(terms[:, :n].contiguous().sum(dim=1, dtype=dtype) / cum[:, n - 1].clamp(min=1).to(dtype))
    return tuple(out)


def average_precision(relevant: Tensor, k: APCutoff = None, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-query average precision of ranked relevance lists ``relevant [Q, n]`` -> ``[Q]``.

    Args:
        relevant: boolean (or 0 / 1) relevance of each query's ranked list, closest first (e.g.
            from :func:`ranked_relevance`).
        k: the cut-off, see the module docstring -- ``None``: AP of the whole given list,
            normalized by its ``R`` relevant items (TREC non-interpolated AP); an ``int``: AP@k of
            the hashing / quantization literature, normalized by the ``R_k`` relevant items among
            the first ``k`` (HashNet / DCH / PQN mAP@topk); ``"R"``: AP@R (Musgrave et al. 2020's
            MAP@R), cut at the query's ``R`` and normalized by ``R``. A list without relevant
            items scores 0.
        dtype: accumulation and output dtype, ``torch.float32`` (query / database metrics and
            attacks) or ``torch.float64`` (:mod:`retrieval.metrics`); the terms ``P(i) rel(i)``
            are float32 in both.
    """
    return average_precisions(relevant, (k,), dtype=dtype)[0]
