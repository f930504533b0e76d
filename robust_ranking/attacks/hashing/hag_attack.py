"""HAG (Yang et al., "Adversarial Examples for Hamming Space Search", IEEE T-Cybernetics 2020), the
untargeted baseline of SDHA (Lu et al., ICMR 2021, Sec. 5.1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from robust_ranking.attacks.attack import _check_nonneg_float
from robust_ranking.attacks.hashing.hashing_attack import PAPER_TANH_SCALES, HashingAttack, HashingContext

__all__ = ["HAGAttack"]


class HAGAttack(HashingAttack):
    """Push the adversarial code away from the query's own code, on the bits not yet flipped.

    Objective (SDHA Sec. 5.1): ``( (1 / k') f'(q~)^T f'(q) + 1 )^2`` with ``f' = m * f``, where
    the mask ``m_j = [f(q~)_j h(q)_j > -t]`` keeps the bits that are not yet flipped by a margin
    ``t`` (HAG's mask, threshold 0.5) and ``k' = sum_j m_j``. It is 0 when every masked bit of
    ``f(q~)`` equals ``-h(q)``. ``f = tanh(gamma g)`` with the shared gamma schedule.
    Optimizer: SGD with momentum 0.9 on the perturbation, projected onto the box. A query stops
    when all its bits are flipped (HAG's rule) or its AP@1000 reaches 0 (SDHA's addition).

    Departures: ``f'(q)`` uses the clean query's sign code ``h(q)`` (the relaxed clean code only
    differs by saturation); HAG's additional bit-balance regularizer is not part of the
    objective SDHA states and is left out; the loss is per query (not a batch mean), so the
    step size does not depend on the batch size. The paper's lr 500 was tuned for 224 x 224 RGB
    inputs and a batch-mean loss; see docs/dch.md for the value used on 28 x 28 images.

    Args:
        eps: L-inf budget (0.039).
        steps: maximum iterations (2000).
        lr: SGD learning rate (500 in the paper).
        momentum: SGD momentum (0.9).
        threshold: the mask margin ``t``.
        topk, check_every, tanh_scales, early_stop, goal_ap, seed: see :class:`attacks.hashing.hashing_attack.HashingAttack`.
    """

    name = "HAG"

    def __init__(
        self,
        *,
        eps: float = 0.039,
        steps: int = 2000,
        lr: float = 500.0,
        momentum: float = 0.9,
        threshold: float = 0.5,
        topk: int = 1000,
        check_every: int = 10,
        tanh_scales: Sequence[Sequence[float]] = PAPER_TANH_SCALES,
        early_stop: bool = True,
        goal_ap: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(eps=eps, steps=steps, lr=lr, topk=topk, check_every=check_every, tanh_scales=tanh_scales,
                         early_stop=early_stop, goal_ap=goal_ap, seed=seed)
        self.momentum = _check_nonneg_float(momentum, "momentum")
        self.threshold = _check_nonneg_float(threshold, "threshold")

    @property
    def hparams(self) -> dict[str, Any]:
        return {**super().hparams, "momentum": self.momentum, "threshold": self.threshold}

    def objective(self, f: Tensor, signs: Tensor, delta: Tensor, ctx: HashingContext, rows: Tensor,
                  consts: dict[str, Tensor]) -> Tensor:
        h = ctx.clean_codes[rows]
        agreement = f * h
        mask = (agreement.detach() > -self.threshold).to(f.dtype)
        k_masked = mask.sum(1).clamp_min(1.0)
        return ((mask * agreement).sum(1) / k_masked + 1.0) ** 2

    def finished(self, signs: Tensor, ctx: HashingContext, rows: Tensor) -> Tensor:
        return (signs == -ctx.clean_codes[rows]).all(1)

    # SGD with momentum (torch.optim.SGD semantics, dampening 0), per query.
    def init_optimizer(self, delta: Tensor) -> dict[str, Tensor]:
        return {"buf": torch.zeros_like(delta)}

    def update(self, delta: Tensor, grad: Tensor, state: dict[str, Tensor], rows: Tensor, step: int) -> Tensor:
        buf = state["buf"][rows].mul_(self.momentum).add_(grad)
        state["buf"][rows] = buf
        return delta - self.lr * buf
