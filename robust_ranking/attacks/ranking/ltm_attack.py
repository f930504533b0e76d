"""Learning-To-Mis-Rank (LTM), one of the ten attacks of RobRank's ERS."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robust_ranking.attacks.attack import Attack, AttackResult
from robust_ranking.attacks.gallery import Gallery
from robust_ranking.attacks.ranking.top1 import query_distances, recall_at_1, self_mask

__all__ = ["LearningToMisrankAttack"]


class LearningToMisrankAttack(Attack):
    """Rank every item of another class above every item of the query's class (LTM).

    Wang et al., "Transferable, Controllable, and Inconspicuous Adversarial Attacks on Person
    Re-identification With Deep Mis-Ranking", CVPR 2020, Eq. 1 (the mis-ranking triplet loss),
    as RobRank runs it on the query (Zhou et al., "Adversarial Attack and Defense in Deep
    Ranking", IEEE TPAMI, arXiv 2106.03614; ``robrank/attacks/advrank.py``, attack type ``LTM``)::

        min_{q~ in Gamma}  [ max_{x in X, y_x != y_q} d(q~, x) - min_{x in X \\ {q}, y_x = y_q} d(q~, x) ]_+

    i.e. pull the farthest item of another class closer than the closest item of q's class, by
    PGD over ``q~ = q + r`` in the eps-ball. No margin (the paper gives none; RobRank neither).
    The attacked samples (``images``) are queries q, gallery members; labels are the gallery's.
    q's own entry is excluded from the positives (RobRank means to, but its ``scatter`` is not
    in place, so its minimum includes q's own clean copy); a query without another positive
    has a zero loss (nothing to mis-rank).

    Metrics (per instance, percent): ``"recall@1"`` after the attack (100 if the top-1 result,
    q excluded, has q's label, else 0), ``"recall@1_clean"`` before. ERS term: the R@1.

    Args:
        eps, alpha, steps, random_start, seed: see :class:`attacks.attack.Attack`.
    """

    name = "LTM"

    def perturb(
        self, model: nn.Module, gallery: Gallery, images: Tensor, sample_indices: Tensor,
        query_labels: Tensor | None = None,
    ) -> AttackResult:
        labels = gallery.labels.to(images.device)
        same = labels[None, :] == labels[sample_indices][:, None]  # [B, N]
        positives = same & ~self_mask(sample_indices, len(gallery))
        negatives = ~same

        def loss_fn(x: Tensor) -> Tensor:
            d = query_distances(model, x, gallery)
            farthest_negative = d.masked_fill(~negatives, float("-inf")).amax(dim=1)
            closest_positive = d.masked_fill(~positives, float("inf")).amin(dim=1)
            loss = torch.relu(farthest_negative - closest_positive)
            # rows without positives or negatives: +-inf terms -> no loss, no gradient
            return torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))

        adversarial = self.pgd(loss_fn, images, sample_indices)
        with torch.no_grad():
            metrics = {
                "recall@1": recall_at_1(query_distances(model, adversarial, gallery), sample_indices, gallery.labels),
                "recall@1_clean": recall_at_1(query_distances(model, images, gallery), sample_indices, gallery.labels),
            }
        return AttackResult(adversarial=adversarial, perturbation=adversarial - images, metrics=metrics)
