"""Pairwise distances that broadcast over leading batch dimensions.

pytorch-metric-learning's distance objects compute ``[A, B]`` matrices only; attacks need
``[..., A, D] x [..., B, D] -> [..., A, B]`` (e.g. each candidate against its own w queries),
so the rankers evaluate the same distance with these functions. Both are differentiable
everywhere the attacks need them.
"""

from __future__ import annotations


import torch.nn.functional as F
from torch import Tensor


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """``1 - cos(a, b)`` for all pairs; inputs need not be normalized."""
    return 1.0 - F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-1, -2)


def euclidean_distance(a: Tensor, b: Tensor) -> Tensor:
    """L2 distance for all pairs, via the expansion ``|a|^2 + |b|^2 - 2ab`` (one matmul).

    The squared distance is clamped at a tiny positive value so that the square root keeps a
    finite gradient at coinciding points.
    """
    sq = (a * a).sum(-1, keepdim=True) + (b * b).sum(-1).unsqueeze(-2) - 2.0 * a @ b.transpose(-1, -2)
    return sq.clamp_min(1e-12).sqrt()


def paired(distance, a: Tensor, b: Tensor) -> Tensor:
    """``distance`` between matching rows of ``a`` and ``b`` (``[B, D]`` each) -> ``[B]``."""
    return distance(a.unsqueeze(-2), b.unsqueeze(-2)).squeeze(-1).squeeze(-1)


__all__ = ["cosine_distance", "euclidean_distance", "paired"]

