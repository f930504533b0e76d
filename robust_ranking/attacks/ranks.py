"""The normalized rank of ECCV 2020 Sec. 4 ("Evaluation Metric"), computed by comparisons.

``R(q, c) = Rank_X(q, c) / |X| * 100%``, where ``Rank_X(q, c)`` is the 0-based position of c
in the ranking of X by distance to q (0 = top). Only the rank of a few targets is needed, so
it is a count of the gallery items strictly closer than the target (O(N) comparisons, no sort).

Exclusions (our reading of the protocol; the paper does not spell them out):

- the query itself is not counted: X doubles as query set and gallery, and a query is not
  a candidate for itself ("self excluded", as in the clean retrieval evaluation);
- the target's own clean copy is not counted: in CA the candidate c is *replaced* by its
  adversarial version c~, so its clean copy must not compete with it; in QA the target is a
  clean gallery member and comparing it with itself would be a no-op anyway.

The denominator stays ``|X| = N`` (the paper's formula), so the largest reachable value is
``100 * (N - 2) / N``: a random target averages about 50% and the minimum is 0%, matching the
tables. Ties (equal distances) are not counted against the target (strict ``<``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["normalized_rank", "self_and_target_mask"]


def normalized_rank(d_target: Tensor, d_gallery: Tensor, exclude_mask: Tensor | None = None) -> Tensor:
    """Normalized rank in percent: ``100 * #{x not excluded : d(q, x) < d(q, target)} / N``.

    Args:
        d_target: distance from the query to the target, shape ``[...]``.
        d_gallery: distances from the query to every gallery item, ``[..., N]``
            (broadcastable against ``d_target[..., None]``).
        exclude_mask: boolean, broadcastable to ``[..., N]``; True marks items not counted
            (see the module docstring: the query itself and the target's clean copy).

    Returns:
        Float tensor of the broadcast leading shape ``[...]``, values in ``[0, 100)``.
    """
    closer = d_gallery < d_target.unsqueeze(-1)
    if exclude_mask is not None:
        closer = closer & ~exclude_mask
    return closer.sum(-1).to(d_gallery.dtype if d_gallery.is_floating_point() else torch.float32) * (
        100.0 / d_gallery.shape[-1]
    )


def self_and_target_mask(query_idx: Tensor, target_idx: Tensor, n_gallery: int) -> Tensor:
    """Boolean ``[B, K, N]`` mask of each (query, target) pair's two gallery items.

    ``query_idx`` and ``target_idx`` are gallery indices of shape ``[B]`` or ``[B, K]`` (a
    ``[B]`` one is shared by the K pairs of its row): in CA the w queries vary and the
    candidate is fixed per row, in QA the other way round.
    """
    q = query_idx if query_idx.dim() == 2 else query_idx[:, None]
    t = target_idx if target_idx.dim() == 2 else target_idx[:, None]
    arange = torch.arange(n_gallery, device=t.device)
    return (arange == q.to(t.device)[..., None]) | (arange == t[..., None])
