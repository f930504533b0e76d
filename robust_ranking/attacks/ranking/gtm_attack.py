"""Greedy Top-1 Misranking (GTM), one of the ten attacks of RobRank's ERS."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robust_ranking.attacks.attack import Attack, AttackResult
from robust_ranking.attacks.gallery import Gallery
from robust_ranking.attacks.ranking.top1 import nearest_non_self, query_distances, recall_at_1, self_mask
from robust_ranking.attacks.selection import nearest_excluding

__all__ = ["GreedyTop1MisrankAttack"]


class GreedyTop1MisrankAttack(Attack):
    """Pull the query onto the nearest item of another class than its top-1 result (GTM).

    Zhou et al., "Adversarial Attack and Defense in Deep Ranking", IEEE TPAMI, arXiv 2106.03614
    (``robrank/attacks/advrank_qcselector.py`` ``_sel_gtm`` and ``advrank_loss.py``
    ``RankLossGreedyTop1Misrank``; goal "top-1 class != original class"). From q's clean ranking
    (gallery embeddings, q's own entry excluded, ties by gallery index): t1 = the top-1 item,
    u = the nearest item whose label differs from t1's ("top-1 unmatching"). Then::

        min_{q~ in Gamma}  d(f(q~), f(u))

    with the ranker's own distance (RobRank: ``1 - cos`` for cosine rankers, the Euclidean
    distance otherwise; its loss keeps only this "unmatching" term, the best of the variants it
    lists), by PGD over ``q~ = q + r`` in the eps-ball. Greedy: u is chosen once, on the clean
    ranking. The attacked samples (``images``) are queries q, gallery members.

    Departure: RobRank's selector takes ``argmin`` of the ranks over the masked (label-filtered)
    columns, which returns a position within that subset, not a gallery index; we take the
    gallery index of the nearest unmatching item, which is what the code means.

    Metrics (per instance, percent): ``"recall@1"`` after the attack (100 if the top-1 result,
    q excluded, has q's label, else 0), ``"recall@1_clean"`` before. ERS term: the R@1.

    Args:
        eps, alpha, steps, random_start, seed: see :class:`attacks.attack.Attack`.
    """

    name = "GTM"

    def select_targets(self, model: nn.Module, gallery: Gallery, sample_indices: Tensor) -> tuple[Tensor, Tensor]:
        """``(t1 [B], u [B])``: each query's clean top-1 and nearest item of another label than t1's."""
        labels = gallery.labels.to(sample_indices.device)
        d_clean = model.distance(gallery.embeddings[sample_indices], gallery.embeddings)  # [B, N]
        top1 = nearest_non_self(d_clean, sample_indices)
        matching = labels[None, :] == labels[top1][:, None]
        unmatching = nearest_excluding(d_clean, 1, exclude=matching | self_mask(sample_indices, len(gallery)))[:, 0]
        return top1, unmatching

    def perturb(
        self, model: nn.Module, gallery: Gallery, images: Tensor, sample_indices: Tensor,
        query_labels: Tensor | None = None,
    ) -> AttackResult:
        with torch.no_grad():
            top1, unmatching = self.select_targets(model, gallery, sample_indices)
            target_emb = gallery.embeddings[unmatching][:, None, :]  # [B, 1, D]

        def loss_fn(x: Tensor) -> Tensor:
            return model.distance(model.embed(x)[:, None, :], target_emb).view(-1)

        adversarial = self.pgd(loss_fn, images, sample_indices)
        with torch.no_grad():
            metrics = {
                "recall@1": recall_at_1(query_distances(model, adversarial, gallery), sample_indices, gallery.labels),
                "recall@1_clean": recall_at_1(query_distances(model, images, gallery), sample_indices, gallery.labels),
            }
        return AttackResult(adversarial=adversarial, perturbation=adversarial - images, metrics=metrics,
                            targets=torch.stack([top1, unmatching], dim=1))
