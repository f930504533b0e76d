"""SDHA, the Smart Deep Hashing Attack (Lu et al., "A Smart Adversarial Attack on Deep Hashing Based
Image Retrieval", ICMR 2021, Sec. 4), untargeted and targeted, and its unweighted variant SDHA-UW."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from robust_ranking.attacks.attack import _check_nonneg_float, _check_positive_int
from robust_ranking.attacks.hashing.attack_trace import AttackTrace
from robust_ranking.attacks.gallery import Gallery
from robust_ranking.attacks.hashing.hashing_attack import PAPER_TANH_SCALES, HashingAttack, HashingAttackResult, HashingContext, TargetLabel
from robust_ranking.attacks.hashing.surrogate_hamming import ap_weights, weighted_surrogate_sum
from robust_ranking.retrieval.hashing_metrics import hamming_distance

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

    with ``d_u`` / ``d_t`` of Eq. (4) / (8) (:mod:`attacks.hashing.surrogate_hamming`) and weight exponent
    ``z`` (untargeted) or ``-z`` (targeted). ``z = 0`` sets every weight to 1: SDHA-UW of Sec. 5.1.
    Optimized with Adam (lr 0.01, betas (0.9, 0.999)) on the perturbation, projected onto the box
    after each step, up to 1500 iterations, each query stopping when its AP@1000 reaches 0
    (untargeted) or 1 (targeted), checked every 10 iterations (Sec. 4.4, 5.1).

    Defaults are the paper's (Sec. 5.1). The Lagrange multiplier is ``alpha = lagrange / K``
    (the paper tunes 5/K .. 100/K per dataset). With ``search_steps > 1`` alpha is found per
    query by the binary search the paper suggests ("similar to [8]", Carlini & Wagner 2017,
    Sec. V): the attack runs ``search_steps`` times from the clean query; after each run a
    query that reached its AP bound (``goal_ap``) gets ``upper = alpha`` and the next alpha
    half-way between its bounds, one that did not gets ``lower = alpha`` and the next alpha
    half-way, or 10 x alpha while no run has succeeded. Each query returns its run of smallest
    final l2 among the successful ones (else the run with the best AP, then the smallest l2),
    with that run's trace and metrics, plus ``lagrange`` (its ``alpha * K``) and
    ``search_iterations`` (iterations over all runs, the cost). Where we depart: the paper leaves the
    ``||.||_2`` term's gradient at ``q~ = q`` undefined; we use 0 (torch's subgradient), so the
    first step is driven by ``F`` alone.

    Args:
        targeted: untargeted (False) or targeted (True) SDHA.
        target_label: targeted only: an int, or ``"random"`` (seeded per query, see
            :mod:`attacks.hashing.hashing_attack`); required then.
        eps: L-inf budget (0.039 = 10/255 in the paper).
        steps: maximum iterations (1500).
        lr: Adam learning rate (0.01).
        lagrange: ``alpha * K`` (``None``: 20, our Fashion-MNIST choice; see docs/dch.md).
        sigma: logistic steepness (None: 5 untargeted / 10 targeted).
        z: weight exponent ``>= 0`` (None: 0.5 untargeted / 0.3 targeted, used as ``-z``); 0 is SDHA-UW.
        betas: Adam's (beta1, beta2).
        search_steps: runs of the per-query binary search of alpha (1: one run, alpha fixed).
        topk, check_every, tanh_scales, early_stop, goal_ap, seed: see :class:`attacks.hashing.hashing_attack.HashingAttack`.
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
        search_steps: int = 1,
        topk: int = 1000,
        check_every: int = 10,
        tanh_scales: Sequence[Sequence[float]] = PAPER_TANH_SCALES,
        early_stop: bool = True,
        goal_ap: float | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(targeted, bool):
            raise ValueError(f"targeted must be a bool, got {targeted!r}")
        self.targeted = targeted
        super().__init__(eps=eps, steps=steps, lr=lr, target_label=target_label, topk=topk, check_every=check_every,
                         tanh_scales=tanh_scales, early_stop=early_stop, goal_ap=goal_ap, seed=seed)
        self.lagrange = 20.0 if lagrange is None else _check_nonneg_float(lagrange, "lagrange", strictly_positive=True)
        self.sigma = _PAPER_SIGMA[targeted] if sigma is None else _check_nonneg_float(sigma, "sigma", True)
        self.z = _PAPER_Z[targeted] if z is None else _check_nonneg_float(z, "z")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.search_steps = _check_positive_int(search_steps, "search_steps")

    @property
    def name(self) -> str:  # type: ignore[override]
        return ("SDHA-UW" if self.z == 0 else "SDHA") + ("-T" if self.targeted else "")

    @property
    def hparams(self) -> dict[str, Any]:
        return {**super().hparams, "lagrange": self.lagrange, "sigma": self.sigma, "z": self.z,
                "betas": list(self.betas), "search_steps": self.search_steps}

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
        lagrange = consts["lagrange"][rows] if "lagrange" in consts else self.lagrange
        alpha = lagrange / f.shape[1]
        return torch.linalg.vector_norm(delta.flatten(1), dim=1) + alpha * f_value

    def perturb(self, model: nn.Module, gallery: Gallery, images: Tensor, sample_indices: Tensor,
                query_labels: Tensor | None = None) -> HashingAttackResult:
        ctx = self._context(model, gallery, images, sample_indices, query_labels)
        consts = self.prepare(ctx)
        batch, device = images.shape[0], images.device
        lagrange = torch.full((batch,), self.lagrange, device=device)
        if self.search_steps == 1:
            # One run needs no search state; the scalar alpha of the objective (no "lagrange"
            # in consts) keeps it bit for bit the attack the earlier tables were made with.
            result = self._optimize(model, images, ctx, consts)
            result.metrics["lagrange"] = lagrange
            result.metrics["search_iterations"] = result.metrics["iterations"].clone()
            return result
        lower = torch.zeros_like(lagrange)
        upper = torch.full_like(lagrange, math.inf)
        best: HashingAttackResult | None = None
        best_lagrange = lagrange.clone()
        spent = torch.zeros_like(lagrange)
        for _ in range(self.search_steps):
            run = self._optimize(model, images, ctx, {**consts, "lagrange": lagrange})
            spent += run.metrics["iterations"]
            success = run.metrics["success"].bool()
            take = torch.ones_like(success) if best is None else self._better(run, best)
            best = run if best is None else _select_rows(take, run, best)
            best_lagrange = torch.where(take, lagrange, best_lagrange)
            upper = torch.where(success, torch.minimum(upper, lagrange), upper)
            lower = torch.where(success, lower, torch.maximum(lower, lagrange))
            lagrange = torch.where(torch.isinf(upper), lagrange * 10.0, (lower + upper) / 2)
        assert best is not None
        best.metrics["lagrange"] = best_lagrange
        best.metrics["search_iterations"] = spent
        return best

    def _better(self, run: HashingAttackResult, best: HashingAttackResult) -> Tensor:
        """``[B]`` whether ``run`` beats ``best`` per query: success first, then l2 (successes) or AP."""
        s_new, s_old = run.metrics["success"].bool(), best.metrics["success"].bool()
        l2_new, l2_old = run.metrics["l2"], best.metrics["l2"]
        ap_new, ap_old = run.metrics["ap"], best.metrics["ap"]
        closer = ap_new > ap_old if self.targeted else ap_new < ap_old
        same_ap = ap_new == ap_old
        return (s_new & ~s_old) | (s_new & s_old & (l2_new < l2_old)) | (
            ~s_new & ~s_old & (closer | (same_ap & (l2_new < l2_old))))

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


def _select_rows(take: Tensor, a: HashingAttackResult, b: HashingAttackResult) -> HashingAttackResult:
    """Per query (row), ``a``'s result where ``take`` else ``b``'s: tensors, metrics and trace."""

    def pick(x: Tensor, y: Tensor) -> Tensor:
        mask = take.to(x.device).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(mask, x, y)

    assert a.trace is not None and b.trace is not None
    trace = AttackTrace(a.trace.iterations, pick(a.trace.ap, b.trace.ap), pick(a.trace.l2, b.trace.l2),
                        a.trace.targeted)
    return HashingAttackResult(
        adversarial=pick(a.adversarial, b.adversarial), perturbation=pick(a.perturbation, b.perturbation),
        metrics={k: pick(a.metrics[k], b.metrics[k]) for k in a.metrics}, targets=a.targets,
        goal_labels=a.goal_labels, trace=trace)

