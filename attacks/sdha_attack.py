"""SDHA, the Smart Deep Hashing Attack (Lu et al., "A Smart Adversarial Attack on Deep Hashing Based
Image Retrieval", ICMR 2021, Sec. 4), untargeted and targeted, and its unweighted variant SDHA-UW."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from attacks.attack import _check_nonneg_float
from attacks.hashing_attack import PAPER_TANH_SCALES, HashingAttack, HashingContext, TargetLabel
from attacks.surrogate_hamming import ap_weights, weighted_surrogate_sum
from retrieval.hashing_metrics import hamming_distance

__all__ = ["SDHAAttack"]

_PAPER_SIGMA = {False: 5.0, True: 10.0}  # Sec. 5.1: sigma 5 (untargeted), 10 (targeted)
_PAPER_Z = {False: 0.5, True: 0.3}  # Sec. 5.1: z = 0.5 (untargeted), -0.3 = -z (targeted)


class SDHAAttack(HashingAttack):
    """SDHA: minimize ``||q~ - q||_2 + alpha * F(q~)`` over ``||q~ - q||_inf <= eps``, ``q~ in [0, 1]`` (Eq. 1).

    ``F`` is the weighted mean surrogate Hamming distance to the database items relevant to the
    attack's goal, with ``f(q~) = tanh(gamma g(q~))`` (Sec. 4.4) and the AP weights of Eq. (5)
    evaluated on the current binary code ``h(q~)`` (constant within a step):

        untargeted, Eq. (6):  F_u = -(1 / n_u) sum_{r in R} d_u(q~, r) * w(q~, r),  R = items of the query's label
        targeted,   Eq. (7):  F_t =  (1 / n_t) sum_{t in T} d_t(q~, t) * w(q~, t),  T = items of the target label

    with ``d_u`` / ``d_t`` of Eq. (4) / (8) (:mod:`attacks.surrogate_hamming`) and weight exponent
    ``z`` (untargeted) or ``-z`` (targeted). ``z = 0`` sets every weight to 1: SDHA-UW of Sec. 5.1.
    Optimized with Adam (lr 0.01, betas (0.9, 0.999)) on the perturbation, projected onto the box
    after each step, up to 1500 iterations, each query stopping when its AP@1000 reaches 0
    (untargeted) or 1 (targeted), checked every 10 iterations (Sec. 4.4, 5.1).

    Defaults are the paper's (Sec. 5.1). The Lagrange multiplier is ``alpha = lagrange / K``
    (the paper tunes 5/K .. 100/K per dataset; binary search "similar to [8]" is left to the
    caller: ``lagrange`` is a constructor argument). Where we depart: the paper leaves the
    ``||.||_2`` term's gradient at ``q~ = q`` undefined; we use 0 (torch's subgradient), so the
    first step is driven by ``F`` alone.

    Args:
        targeted: untargeted (False) or targeted (True) SDHA.
        target_label: targeted only: an int, or ``"random"`` (seeded per query, see
            :mod:`attacks.hashing_attack`); required then.
        eps: L-inf budget (0.039 = 10/255 in the paper).
        steps: maximum iterations (1500).
        lr: Adam learning rate (0.01).
        lagrange: ``alpha * K`` (``None``: 20, our Fashion-MNIST choice; see docs/dch.md).
        sigma: logistic steepness (None: 5 untargeted / 10 targeted).
        z: weight exponent ``>= 0`` (None: 0.5 untargeted / 0.3 targeted, used as ``-z``); 0 is SDHA-UW.
        betas: Adam's (beta1, beta2).
        topk, check_every, tanh_scales, early_stop, seed: see :class:`attacks.hashing_attack.HashingAttack`.
    """

    def __init__(
        self,
        targeted: bool = False,
        target_label: TargetLabel = None,
        *,
        eps: float = 0.039,
        steps: int = 1500,
        lr: float = 0.01,
        lagrange: float | None = None,
        sigma: float | None = None,
        z: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        topk: int = 1000,
        check_every: int = 10,
        tanh_scales: Sequence[Sequence[float]] = PAPER_TANH_SCALES,
        early_stop: bool = True,
        seed: int = 0,
    ) -> None:
        if not isinstance(targeted, bool):
            raise ValueError(f"targeted must be a bool, got {targeted!r}")
        self.targeted = targeted
        super().__init__(eps=eps, steps=steps, lr=lr, target_label=target_label, topk=topk, check_every=check_every,
                         tanh_scales=tanh_scales, early_stop=early_stop, seed=seed)
        self.lagrange = 20.0 if lagrange is None else _check_nonneg_float(lagrange, "lagrange", strictly_positive=True)
        self.sigma = _PAPER_SIGMA[targeted] if sigma is None else _check_nonneg_float(sigma, "sigma", True)
        self.z = _PAPER_Z[targeted] if z is None else _check_nonneg_float(z, "z")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))

    @property
    def name(self) -> str:  # type: ignore[override]
        return ("SDHA-UW" if self.z == 0 else "SDHA") + ("-T" if self.targeted else "")

    @property
    def hparams(self) -> dict[str, Any]:
        return {**super().hparams, "lagrange": self.lagrange, "sigma": self.sigma, "z": self.z,
                "betas": list(self.betas)}

    def prepare(self, ctx: HashingContext) -> dict[str, Tensor]:
        # A trained hashing model maps the database onto few distinct codes, and the objective
        # depends on an item only through its code: sum over the distinct codes, each weighted
        # by how many relevant items carry it (exact; ~N / #codes times fewer operations).
        unique, inverse = torch.unique(ctx.codes, dim=0, return_inverse=True)
        counts = torch.zeros(ctx.relevant.shape[0], unique.shape[0], device=unique.device)
        counts.index_add_(1, inverse, ctx.relevant.to(counts.dtype))
        return {"unique_codes": unique, "relevant_counts": counts}

    def objective(self, f: Tensor, signs: Tensor, delta: Tensor, ctx: HashingContext, rows: Tensor,
                  consts: dict[str, Tensor]) -> Tensor:
        codes, counts = consts["unique_codes"], consts["relevant_counts"][rows]
        exponent = -self.z if self.targeted else self.z
        weights = ap_weights(hamming_distance(signs, codes), exponent) * counts  # Eq. 5, no gradient
        surrogate = weighted_surrogate_sum(f, codes, weights, self.sigma, self.targeted)
        f_value = surrogate / counts.sum(1).clamp_min(1)  # Eq. 6 / 7 (sign below)
        if not self.targeted:
            f_value = -f_value
        alpha = self.lagrange / f.shape[1]
        return torch.linalg.vector_norm(delta.flatten(1), dim=1) + alpha * f_value

    # Adam (Kingma & Ba), per query; all active queries share the step count.
    def init_optimizer(self, delta: Tensor) -> dict[str, Tensor]:
        return {"m": torch.zeros_like(delta), "v": torch.zeros_like(delta)}

    def update(self, delta: Tensor, grad: Tensor, state: dict[str, Tensor], rows: Tensor, step: int) -> Tensor:
        b1, b2 = self.betas
        m = state["m"][rows].mul_(b1).add_(grad, alpha=1 - b1)
        v = state["v"][rows].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        state["m"][rows], state["v"][rows] = m, v
        t = step + 1
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        return delta - self.lr * m_hat / (v_hat.sqrt() + 1e-8)

