"""ES:R, the Recall@1 after the embedding-shift attack, one of the ten attacks of RobRank's ERS."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robust_ranking.attacks.attack import AttackResult
from robust_ranking.attacks.gallery import Gallery
from robust_ranking.attacks.ranking.max_shift_attack import JITTER, MaxShiftAttack, _shift_loss, embedding_shift
from robust_ranking.attacks.ranking.top1 import query_distances, recall_at_1
from robust_ranking.attacks.selection import keyed_uniform

__all__ = ["EmbeddingShiftRecallAttack"]


class EmbeddingShiftRecallAttack(MaxShiftAttack):
    """The ES attack's adversarial queries, measured by Recall@1 (ES:R).

    Zhou et al., "Adversarial Attack and Defense in Deep Ranking", IEEE TPAMI, arXiv 2106.03614
    (ERS terms ES:D and ES:R; ``robrank/attacks/advrank.py``, attack type ``ES``, which reports both
    ``embshift`` and ``r@1`` of the same adversarial examples): the maximum embedding shift of
    ECCV 2020 Sec. 3.3, ``max_{r in Gamma} d(f(q + r), f(q))``, is an untargeted attack on the
    query; ES:R measures how often the top-1 result still has the query's label.

    The perturbation is exactly :class:`MaxShiftAttack`'s (same PGD, same keyed start, stream
    ``"ES/start"``), so an ``ES`` and an ``ES:R`` entry of a suite with the same eps / alpha / steps
    attack with identical images and ES:D and ES:R come from the same adversarial queries, as in
    RobRank.

    Metrics (per instance, percent): ``"recall@1"`` = 100 if the nearest gallery item to f(q~),
    q's own entry excluded, has q's label, else 0; ``"recall@1_clean"`` the same for q; ``"shift"``
    = d(f(q~), f(q)) (ES's metric).

    Args:
        eps, alpha, steps, random_start, seed: see :class:`attacks.attack.Attack`.
    """

    name = "ES:R"
    #: the random-start stream of the ES attack whose perturbation this attack reproduces
    stream = "ES"

    def perturb(
        self, model: nn.Module, gallery: Gallery, images: Tensor, sample_indices: Tensor,
        query_labels: Tensor | None = None,
    ) -> AttackResult:
        with torch.no_grad():
            clean = model.embed(images)
        delta0 = None
        if self.eps > 0:  # MaxShiftAttack.perturb's start, keyed by the ES stream
            u = keyed_uniform(self.seed, sample_indices, tuple(images.shape[1:]), stream=f"{self.stream}/start",
                              dtype=images.dtype)
            delta0 = (2.0 * u - 1.0) * (self.eps * (1.0 if self.random_start else JITTER))
        adversarial = self.pgd(_shift_loss(model, clean), images, sample_indices, delta0=delta0)
        with torch.no_grad():
            metrics = {
                "recall@1": recall_at_1(query_distances(model, adversarial, gallery), sample_indices, gallery.labels),
                "recall@1_clean": recall_at_1(query_distances(model, images, gallery), sample_indices, gallery.labels),
                "shift": embedding_shift(model, adversarial, clean),
            }
        return AttackResult(adversarial=adversarial, perturbation=adversarial - images, metrics=metrics)
