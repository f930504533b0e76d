"""SDHA's dimension-wise surrogate Hamming distance and AP-oriented weights (Lu et al., ICMR 2021, Sec. 4.3).

With ``f = f(q~) in (-1, 1)^K`` the relaxed code of the adversarial query, ``h = h(r) in {-1, 1}^K``
a database code and ``s(x) = 1 / (1 + exp(-x))`` the logistic function:

    untargeted, Eq. (4):  d_u(f, h) = sum_j [ |f_j - h_j| / 2 * s(sigma f_j h_j) + (1 - s(sigma f_j h_j)) ]
    targeted,   Eq. (8):  d_t(f, h) = sum_j   |f_j - h_j| / 2 * s(-sigma f_j h_j)
    weights,    Eq. (5):  w(q~, r) = (1 / d_H(h(q~), h(r)))^z,  d_H = 0 counted as 0.5

Because every ``h_j`` is +1 or -1, the per-dimension term takes one of two values,
``t+_j`` (for ``h_j = +1``) or ``t-_j`` (``h_j = -1``), so

    d(f, h) = 1/2 sum_j (t+_j + t-_j) + 1/2 sum_j h_j (t+_j - t-_j)

is affine in ``h``: the distances to a whole database are one matrix product, and a weighted
sum over the relevant items ``sum_i w_i d(f, h_i)`` needs only ``sum_i w_i`` and
``sum_i w_i h_i`` (:func:`weighted_surrogate_sum`). Exact, not an approximation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ap_weights", "surrogate_hamming", "surrogate_terms", "weighted_surrogate_sum"]


def surrogate_terms(f: Tensor, sigma: float, targeted: bool) -> tuple[Tensor, Tensor]:
    """Per-dimension surrogate for a database bit ``+1`` and ``-1``: ``(t+, t-)``, each like ``f``.

    Untargeted (Eq. 4) rewards flipping bits that still agree with the database code (the
    ``|f - h| / 2`` branch) and counts a disagreeing bit as a full unit; targeted (Eq. 8)
    pulls only disagreeing bits towards the database code.
    """
    p = torch.sigmoid(sigma * f)  # s(sigma f h) for h = +1; s(-sigma f) = 1 - p for h = -1
    half_gap_pos, half_gap_neg = 0.5 * (1.0 - f), 0.5 * (1.0 + f)  # |f - 1| / 2, |f + 1| / 2 for |f| <= 1
    if targeted:
        return half_gap_pos * (1.0 - p), half_gap_neg * p
    return half_gap_pos * p + (1.0 - p), half_gap_neg * (1.0 - p) + p


def surrogate_hamming(f: Tensor, codes: Tensor, sigma: float, targeted: bool = False) -> Tensor:
    """``d_u`` (Eq. 4) or ``d_t`` (Eq. 8) between relaxed codes ``f [B, K]`` and ``codes [N, K]`` -> ``[B, N]``."""
    t_pos, t_neg = surrogate_terms(f, sigma, targeted)
    return 0.5 * (t_pos + t_neg).sum(-1, keepdim=True) + 0.5 * (t_pos - t_neg) @ codes.to(f.dtype).T


def weighted_surrogate_sum(f: Tensor, codes: Tensor, weights: Tensor, sigma: float, targeted: bool) -> Tensor:
    """``sum_i weights[b, i] * d(f_b, codes_i)`` -> ``[B]`` without forming the ``[B, N]`` distances.

    ``weights [B, N]`` is constant (no gradient), e.g. Eq. (5) times the relevance mask.
    """
    t_pos, t_neg = surrogate_terms(f, sigma, targeted)
    total = weights.sum(-1)  # [B]
    direction = weights.to(f.dtype) @ codes.to(f.dtype)  # [B, K]: sum_i w_i h_i
    return 0.5 * (t_pos + t_neg).sum(-1) * total + 0.5 * ((t_pos - t_neg) * direction).sum(-1)


def ap_weights(hamming: Tensor, exponent: float) -> Tensor:
    """Eq. (5): ``(1 / d_H)^exponent`` with ``d_H = 0`` read as 0.5; ``exponent = 0`` gives 1 (SDHA-UW).

    The paper uses ``exponent = z >= 0`` for the untargeted attack (near relevant items count
    more) and ``-z`` for the targeted one (far target items count more).

    ``hamming`` must hold integer values (Hamming distances). The weights are looked up in a
    table of the ``max + 1`` possible values, computed in Python: a vectorized ``pow`` over the
    ``[B, N]`` tensor rounds its scalar tail differently from its vector body, so a query's weights
    (and its attack) would depend, in the last bit, on its row in the batch -- and DDP shards,
    which batch queries differently, would not reproduce the single-process numbers.
    """
    if exponent == 0.0:
        return torch.ones_like(hamming)
    if hamming.numel() == 0:
        return hamming.clone()
    if not bool((hamming >= 0).all()) or not torch.equal(hamming, hamming.round()):
        raise ValueError("ap_weights needs non-negative integer Hamming distances")
    top = int(hamming.max())
    table = [math.pow(0.5 if d == 0 else float(d), -exponent) for d in range(top + 1)]  # <= K + 1 entries
    return torch.tensor(table, dtype=hamming.dtype, device=hamming.device)[hamming.long()]
