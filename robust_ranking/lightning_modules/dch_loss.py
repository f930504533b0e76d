"""The Deep Cauchy Hashing loss (Cao et al., "Deep Cauchy Hashing for Hamming Space Retrieval", CVPR 2018)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DCHLoss", "normalized_hamming_distance"]


def normalized_hamming_distance(a: Tensor, b: Tensor) -> Tensor:
    """DCH Eq. (4): ``d(h_i, h_j) = K / 2 * (1 - cos(h_i, h_j))`` for all pairs ``[..., A, B]``.

    For binary codes in ``{-1, 1}^K`` it equals the Hamming distance; for the tanh relaxation it
    is a smooth, scale-free surrogate (the cosine ignores how saturated a code is).
    """
    k = a.shape[-1]
    cos = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-1, -2)
    return 0.5 * k * (1.0 - cos)


class DCHLoss(nn.Module):
    """Pairwise Cauchy cross-entropy plus Cauchy quantization loss (DCH, CVPR 2018, Eq. 2-9).

    For the tanh codes ``h`` of a batch and the pairwise similarity ``s_ij = [y_i == y_j]``
    (``i != j``), with ``d_ij`` the normalized Hamming distance (Eq. 4):

        Cauchy probability       sigma(d) = gamma / (gamma + d)                         (Eq. 5)
        pair term                l_ij = s_ij log(1 + d_ij / gamma)
                                      + (1 - s_ij) log(1 + gamma / d_ij)                (Eq. 6)
        class balance            w_ij = |S| / |S_1| (similar), |S| / |S_0| (dissimilar) (Eq. 3)
        quantization             q_i = log(1 + d(|h_i|, 1) / gamma)                     (Eq. 7)
        loss                     (1 / |S|) sum_ij w_ij l_ij + lambda * mean_i q_i       (Eq. 8)

    The pair term is the weighted cross-entropy of Eq. 6 written per case (``-log sigma`` for
    similar pairs, ``-log(1 - sigma)`` for dissimilar ones), which avoids the cancelling
    ``log(d / gamma) + log(1 + gamma / d)`` of the paper's combined form. With the balance
    weights, the pair term is the mean over similar pairs plus the mean over dissimilar pairs.

    Departures (documented in docs/dch.md): the paper sums over pairs, we average (so the loss
    scale does not depend on the batch size); ``d`` is clamped at ``eps`` in ``gamma / d`` (a
    dissimilar pair with identical codes has an infinite loss otherwise).

    Args:
        gamma: Cauchy scale (DCH cross-validates it; SDHA trains its DCH models with 30). Small
            values concentrate similar pairs into a small Hamming ball.
        quantization_weight: lambda of Eq. 8.
        eps: lower bound of ``d`` in the dissimilar term.
    """

    def __init__(self, gamma: float = 20.0, quantization_weight: float = 0.1, eps: float = 1e-4) -> None:
        super().__init__()
        for name, value in (("gamma", gamma), ("eps", eps)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"DCHLoss {name} must be a finite number > 0, got {value!r}")
        if not (isinstance(quantization_weight, (int, float)) and math.isfinite(quantization_weight)
                and quantization_weight >= 0):
            raise ValueError(f"DCHLoss quantization_weight must be a finite number >= 0, got {quantization_weight!r}")
        self.gamma = float(gamma)
        self.quantization_weight = float(quantization_weight)
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, quantization_weight={self.quantization_weight}, eps={self.eps}"

    def components(self, codes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(pair_loss, quantization_loss)`` of ``codes [B, K]`` (tanh outputs) and ``labels [B]``."""
        if codes.dim() != 2 or labels.shape != (codes.shape[0],):
            raise ValueError(f"DCHLoss needs codes [B, K] and labels [B], got {tuple(codes.shape)} and "
                             f"{tuple(labels.shape)}")
        n = codes.shape[0]
        d = normalized_hamming_distance(codes, codes)
        off_diag = ~torch.eye(n, dtype=torch.bool, device=codes.device)
        similar = (labels[:, None] == labels[None, :]) & off_diag
        dissimilar = (labels[:, None] != labels[None, :])
        loss_sim = torch.log1p(d / self.gamma)
        loss_dis = torch.log1p(self.gamma / d.clamp_min(self.eps))
        # Balance weights |S|/|S_1|, |S|/|S_0| over the mean: each group's mean, summed (Eq. 3, 6).
        pair = _masked_mean(loss_sim, similar) + _masked_mean(loss_dis, dissimilar)
        ones = torch.ones_like(codes[:1])
        d_quant = normalized_hamming_distance(codes.abs(), ones).squeeze(-1)  # d(|h_i|, 1), Eq. 7
        quant = torch.log1p(d_quant / self.gamma).mean()
        return pair, quant

    def forward(self, codes: Tensor, labels: Tensor) -> Tensor:
        pair, quant = self.components(codes, labels)
        return pair + self.quantization_weight * quant


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask``; 0 (still in the graph) when the mask is empty."""
    return (values * mask).sum() / mask.sum().clamp_min(1)
