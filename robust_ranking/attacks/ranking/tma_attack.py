"""Targeted Mismatch Attack (TMA), one of the ten attacks of RobRank's ERS."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robust_ranking.attacks.attack import Attack, AttackResult
from robust_ranking.attacks.gallery import Gallery
from robust_ranking.attacks.selection import random_targets

__all__ = ["TargetedMismatchAttack"]


class TargetedMismatchAttack(Attack):
    """Make the query's embedding match that of a random other image (TMA).

    Tolias et al., "Targeted Mismatch Adversarial Attack: Query with a Flower to Retrieve the
    Tower", ICCV 2019, in the global-descriptor form RobRank uses (Zhou et al., "Adversarial
    Attack and Defense in Deep Ranking", IEEE TPAMI, arXiv 2106.03614;
    ``robrank/attacks/advrank_loss.py``, ``RankLossTargetedMismatchAttack``)::

        min_{q~ in Gamma}  1 - cos(f(q~), f(t))

    by PGD over ``q~ = q + r``, ``||r||_inf <= eps``, ``q~ in [0, 1]``. The attacked samples
    (``images``) are queries q (gallery members); the target t is drawn uniformly from X
    without q itself (RobRank draws from all of X; excluding q removes the degenerate
    "target = self" draw), keyed by q's gallery index (stream ``"TMA"``).

    Cosine is the metric whatever the ranker's distance (it is scale invariant, so it applies
    to non-normalized Euclidean embeddings too, as in RobRank).

    Metrics (per instance): ``"cos"`` = ``cos(f(q~), f(t))`` (an effective attack raises it
    towards 1; ERS term ``100 (1 - cos)``), ``"cos_clean"`` the same for the clean q.

    Args:
        eps, alpha, steps, random_start, seed: see :class:`attacks.attack.Attack`.
    """

    name = "TMA"

    def perturb(
        self, model: nn.Module, gallery: Gallery, images: Tensor, sample_indices: Tensor,
        query_labels: Tensor | None = None,
    ) -> AttackResult:
        with torch.no_grad():
            targets = random_targets(self.seed, sample_indices, len(gallery), 1, exclude_self=True,
                                     stream=self.name)  # [B, 1]
            target_emb = gallery.embeddings[targets[:, 0]]

        def cos(x: Tensor) -> Tensor:
            return F.cosine_similarity(model.embed(x), target_emb, dim=-1)

        adversarial = self.pgd(lambda x: 1.0 - cos(x), images, sample_indices)
        with torch.no_grad():
            metrics = {"cos": cos(adversarial), "cos_clean": cos(images)}
        return AttackResult(adversarial=adversarial, perturbation=adversarial - images, metrics=metrics,
                            targets=targets)
