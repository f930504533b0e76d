"""Greedy Top-1 Translocation (GTT), one of the ten attacks of RobRank's ERS."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robust_ranking.attacks.attack import Attack, AttackResult
from robust_ranking.attacks.gallery import Gallery
from robust_ranking.attacks.ranking.top1 import nearest_non_self, query_distances, self_mask, stable_position

__all__ = ["GreedyTop1TranslocationAttack"]


class GreedyTop1TranslocationAttack(Attack):
    """Push the query's clean top-1 result out of the top of its ranking (GTT).

    Zhou et al., "Adversarial Attack and Defense in Deep Ranking", IEEE TPAMI, arXiv 2106.03614
    (``robrank/attacks/advrank_qcselector.py`` ``_sel_gtt``, ``advrank_loss.py``
    ``RankLossGreedyTop1Translocation``, ``advrank.py`` attack type ``GTT``; goal "top-1 identity
    != original identity"). With t1 the top-1 item of q's clean ranking (gallery embeddings,
    q's own entry excluded, ties by gallery index), GTT is the QA- loss (ECCV 2020 Eq. 9) with
    the single candidate t1::

        min_{q~ in Gamma}  sum_{x in X \\ {q, t1}} [d(q~, x) - d(q~, t1)]_+

    by PGD over ``q~ = q + r`` in the eps-ball. The attacked samples (``images``) are queries q,
    gallery members. RobRank averages the hinge over x and includes q's own clean copy and t1 in
    it; we sum, as our QA- does, and skip those two items (q's copy is not ranked, t1's term is
    zero): per-sample scaling does not change PGD's sign steps.

    Metrics (per instance, percent): ``"retain@4"`` = 100 if t1 is still among the top ``k`` = 4 of
    q~'s ranking (q excluded, ties by gallery index), else 0 (RobRank's ``retain@4``, GTT's ERS
    term); ``"retain@1"``: t1 is still the top-1 (RobRank's ``ID-Retain@1``); ``"retain@4_clean"``
    (100 by construction) and ``"retain@1_clean"`` for q.

    Args:
        eps, alpha, steps, random_start, seed: see :class:`attacks.attack.Attack`.
    """

    name = "GTT"

    #: the retain cut-off (RobRank's retain@4)
    k = 4

    def perturb(
        self, model: nn.Module, gallery: Gallery, images: Tensor, sample_indices: Tensor,
        query_labels: Tensor | None = None,
    ) -> AttackResult:
        n = len(gallery)
        with torch.no_grad():
            d_clean = model.distance(gallery.embeddings[sample_indices], gallery.embeddings)  # [B, N]
            top1 = nearest_non_self(d_clean, sample_indices)
            arange = torch.arange(n, device=top1.device)[None, :]
            skipped = self_mask(sample_indices, n) | (arange == top1[:, None])

        def loss_fn(x: Tensor) -> Tensor:
            d = query_distances(model, x, gallery)
            d_t1 = d.gather(1, top1[:, None])
            return torch.relu(d - d_t1).masked_fill(skipped, 0.0).sum(dim=1)  # Eq. 9 with C = {t1}

        adversarial = self.pgd(loss_fn, images, sample_indices)
        with torch.no_grad():
            metrics = {}
            for key, x in (("", adversarial), ("_clean", images)):
                position = stable_position(query_distances(model, x, gallery), sample_indices, top1)
                metrics[f"retain@{self.k}{key}"] = (position < self.k).to(images.dtype) * 100.0
                metrics[f"retain@1{key}"] = (position < 1).to(images.dtype) * 100.0
        return AttackResult(adversarial=adversarial, perturbation=adversarial - images, metrics=metrics,
                            targets=top1[:, None])
