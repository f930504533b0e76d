"""Candidate Attack (CA+ / CA-), ECCV 2020 Sec. 3.1."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from robust_ranking.attacks.attack import Attack, AttackResult, _check_positive_int
from robust_ranking.attacks.gallery import Gallery
from robust_ranking.attacks.ranks import normalized_rank, self_and_target_mask
from robust_ranking.attacks.selection import random_targets, top_percent_targets

__all__ = ["CandidateAttack"]


class CandidateAttack(Attack):
    """Raise (CA+) or lower (CA-) the rank of a candidate c w.r.t. w queries by perturbing c.

    Zhou et al., "Adversarial Ranking Attack and Defense", ECCV 2020, Sec. 3.1:

        CA+: L(c~, Q; X) = sum_{q in Q} sum_{x in X} [d(q, c~) - d(q, x)]_+     (Eq. 4)
        CA-: L(c~, Q; X) = sum_{q in Q} sum_{x in X} [d(q, x) - d(q, c~)]_+     (Eq. 7)

    minimized by PGD (Eq. 5-6) over ``c~ = c + r``, ``||r||_inf <= eps``, ``c~ in [0, 1]``.
    The attacked samples (``images``) are the candidates c. Targets (Sec. 4): the w queries Q
    are drawn uniformly from X for CA+, and from the top-``percent``% of c's clean ranking,
    ``{q in X | R(c, q) <= 1%}``, for CA-; never c itself. Draws are keyed by c's gallery index.

    The inner sum skips x = q and x = c (c's clean copy), the two items the metric
    :func:`attacks.ranks.normalized_rank` does not count, so the surrogate and the measured
    rank agree (a small departure from the literal "x in X" of Eq. 4/7: for x = q the hinge
    asks for d(q, c~) < d(q, q) = 0, a constraint that can never be met).

    Metric (Sec. 4): ``R_CA(c) = mean_{q in Q} R(q, c~)`` -> ``metrics["rank"]``; the same
    for the clean c -> ``metrics["rank_clean"]``; both in percent, per instance.

    Args:
        direction: ``"+"`` (CA+, raise the rank towards 0%) or ``"-"`` (CA-, towards 100%).
        w: number of queries per attacked candidate (paper: 1, 2, 5, 10).
        eps, alpha, steps, random_start, seed: see :class:`attacks.attack.Attack`.
        percent: size of the top ranking pool for CA- (paper: 1%).
    """

    def __init__(
        self,
        direction: Literal["+", "-"],
        w: int = 1,
        *,
        eps: float,
        alpha: float | None = None,
        steps: int | None = None,
        random_start: bool = False,
        seed: int = 0,
        percent: float = 1.0,
    ) -> None:
        if direction not in ("+", "-"):
            raise ValueError(f"direction must be '+' or '-', got {direction!r}")
        super().__init__(eps, alpha=alpha, steps=steps, random_start=random_start, seed=seed)
        self.direction = direction
        self.w = _check_positive_int(w, "w")
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0.0 < percent <= 100.0:
            raise ValueError(f"percent must be in (0, 100], got {percent!r}")
        self.percent = float(percent)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"CA{self.direction}"

    @property
    def hparams(self) -> dict:
        return {**super().hparams, "w": self.w, "percent": self.percent}

    def select_queries(self, gallery: Gallery, model: nn.Module, sample_indices: Tensor) -> Tensor:
        """The ``[B, w]`` query indices Q of each attacked candidate (from clean gallery embeddings)."""
        n = len(gallery)
        if self.w > n - 1:
            raise ValueError(f"w={self.w} queries need a gallery of more than {self.w} items, got {n}")
        if self.direction == "+":
            return random_targets(self.seed, sample_indices, n, self.w, exclude_self=True, stream=self.name)
        # R(c, q): the ranking of X by distance to c, from the (batch-independent) gallery rows.
        d_c = model.distance(gallery.embeddings[sample_indices], gallery.embeddings)
        return top_percent_targets(self.seed, sample_indices, d_c, self.w, self.percent, stream=self.name)

    def perturb(
        self, model: nn.Module, gallery: Gallery, images: Tensor, sample_indices: Tensor,
        query_labels: Tensor | None = None,
    ) -> AttackResult:
        with torch.no_grad():
            queries = self.select_queries(gallery, model, sample_indices)  # [B, w]
            q_emb = gallery.embeddings[queries]  # [B, w, D]
            d_qx = model.distance(q_emb, gallery.embeddings)  # [B, w, N], constant over the attack
            excluded = self_and_target_mask(queries, sample_indices, len(gallery))  # [B, w, N]
        sign = 1.0 if self.direction == "+" else -1.0

        def d_q_c(x: Tensor) -> Tensor:
            """d(q, c) for each instance's own queries: ``[B, w]`` (one embed of the batch)."""
            return model.distance(q_emb, model.embed(x)[:, None, :]).squeeze(-1)

        def loss_fn(x: Tensor) -> Tensor:
            # Eq. 4 (sign +1) / Eq. 7 (sign -1): hinge over every (q, x) pair.
            hinge = torch.relu(sign * (d_q_c(x)[:, :, None] - d_qx)).masked_fill(excluded, 0.0)
            return hinge.sum(dim=(1, 2))

        adversarial = self.pgd(loss_fn, images, sample_indices)
        with torch.no_grad():
            rank = normalized_rank(d_q_c(adversarial), d_qx, excluded).mean(-1)
            rank_clean = normalized_rank(d_q_c(images), d_qx, excluded).mean(-1)
        return AttackResult(
            adversarial=adversarial,
            perturbation=adversarial - images,
            metrics={"rank": rank, "rank_clean": rank_clean},
            targets=queries,
        )
