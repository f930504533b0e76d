"""DHTA (Bai et al., "Targeted Attack for Deep Hashing based Retrieval", ECCV 2020), the targeted
baseline of SDHA (Lu et al., ICMR 2021, Sec. 5.1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from robust_ranking.attacks.attack import _check_positive_int
from robust_ranking.attacks.hashing.hashing_attack import PAPER_TANH_SCALES, HashingAttack, HashingContext, TargetLabel
from robust_ranking.attacks.selection import keys
from robust_ranking.retrieval.hashing_metrics import sign_codes

__all__ = ["DHTAAttack"]


class DHTAAttack(HashingAttack):
    """Move the adversarial code towards the anchor code of the target class.

    Anchor code (DHTA's component voting): ``h_a = sgn(sum_{i <= n_f} h(t_i))`` over ``n_f``
    database items ``t_i`` of the target label drawn at random per query (keyed by the seed and
    the query's index); it minimizes the mean Hamming distance to those codes. Objective (SDHA
    Sec. 5.1): ``-(1 / K) f(q~)^T h_a`` with ``f = tanh(gamma g)`` and the shared gamma
    schedule, minimized by sign-gradient (PGD) steps projected onto the box; a query stops when
    its AP@1000 w.r.t. the target label reaches 1 (SDHA's addition).

    ``AttackResult.targets`` holds the ``[B, n_f]`` database indices of the voting items (fewer
    columns when the target class is smaller than ``n_f``). With an even ``n_f`` a tied vote
    gives ``-1`` (``sgn(0) = -1``, as :func:`retrieval.sign_codes`).

    Args:
        target_label: an int, or ``"random"`` (seeded per query); required.
        eps: L-inf budget (0.039).
        steps: maximum iterations (2000).
        lr: the sign-step size; the paper's "learning rate 1" is on the 0..255 pixel scale,
            i.e. 1/255 here.
        n_f: number of voting target-class items (9).
        topk, check_every, tanh_scales, early_stop, goal_ap, seed: see :class:`attacks.hashing.hashing_attack.HashingAttack`.
    """

    name = "DHTA"
    targeted = True

    def __init__(
        self,
        target_label: TargetLabel = None,
        *,
        eps: float = 0.039,
        steps: int = 2000,
        lr: float = 1.0 / 255.0,
        n_f: int = 9,
        topk: int = 1000,
        check_every: int = 10,
        tanh_scales: Sequence[Sequence[float]] = PAPER_TANH_SCALES,
        early_stop: bool = True,
        goal_ap: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(eps=eps, steps=steps, lr=lr, target_label=target_label, topk=topk, check_every=check_every,
                         tanh_scales=tanh_scales, early_stop=early_stop, goal_ap=goal_ap, seed=seed)
        self.n_f = _check_positive_int(n_f, "n_f")

    @property
    def hparams(self) -> dict[str, Any]:
        return {**super().hparams, "n_f": self.n_f}

    def prepare(self, ctx: HashingContext) -> dict[str, Tensor]:
        n = ctx.codes.shape[0]
        k = keys(self.seed, ctx.sample_indices, torch.arange(n, device=ctx.codes.device), stream="DHTA/anchor")
        k = k.masked_fill(~ctx.relevant, torch.iinfo(torch.int64).max)
        count = min(self.n_f, int(ctx.relevant.sum(1).min()))
        if count == 0:
            raise ValueError("DHTA: the target label has no item in the gallery")
        chosen = torch.sort(k, dim=1, stable=True).indices[:, :count]  # [B, n_f] random target items
        anchor = sign_codes(ctx.codes[chosen].sum(1))
        return {"anchor": anchor, "targets": chosen}

    def objective(self, f: Tensor, signs: Tensor, delta: Tensor, ctx: HashingContext, rows: Tensor,
                  consts: dict[str, Tensor]) -> Tensor:
        return -(f * consts["anchor"][rows]).sum(1) / f.shape[1]

    def update(self, delta: Tensor, grad: Tensor, state: dict[str, Tensor], rows: Tensor, step: int) -> Tensor:
        return delta - self.lr * grad.sign()
