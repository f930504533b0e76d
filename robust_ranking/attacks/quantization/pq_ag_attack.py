"""PQ-AG: adversarial queries against product-quantization retrieval (Basic, APD, AOD).

Feng et al., "Adversarial Attack on Deep Product Quantization Network for Image Retrieval",
AAAI 2020. Every variant minimizes a per-query loss by L-inf PGD in ``[0, 1]`` pixel space
(Eq. 2's constraint ``||y - y^|| <= eta``):

- **Basic** (Eq. 3): ``L = -||F(y) - F(y^)||_2^2`` on the deep feature ``F = model.embed``.
- **APD**, type I (Eq. 8): ``L = sum_m log p^_{m b_m}``, the log-probability of the clean query's
  peak codeword ``b_m`` (Eq. 6, the hard code) under the adversarial soft assignment ``p^``
  (Eq. 7) -- the negative cross-entropy against the one-hot clean distribution.
- **AOD**, type II (Eq. 9): ``L = sum_m sum_k p_mk log p^_mk`` against the clean query's whole
  soft distribution ``p`` (equivalently: maximize KL(p || p^), up to the constant entropy of p).

Protocol (the query / database protocol of the paper's Sec. "Datasets and Metrics"): the
attacked samples are **queries**; the gallery is the database as the retrieval system stores
it, ``Gallery(embeddings=model.encode(database images), labels=database labels)`` -- the hard
codes for PQ rankers. ``sample_indices`` are the queries' indices in the query set (they key
the random start). The query labels are needed to measure AP and are passed explicitly::

    gallery = Gallery(model.encode(db_images), db_labels)
    result = PQAGAttack("aod")(model, gallery, queries, query_indices, query_labels=labels)
    result.metrics["ap_sdc"].mean()  # mAP of the adversarial queries under SDC

Metrics, per query (means over queries are mAPs): ``ap_sdc`` / ``ap_adc`` (the adversarial
query against the database under SDC / ADC) and ``ap_sdc_clean`` / ``ap_adc_clean``, plus
``code_change`` (fraction of the M sub-codes of the query that the attack changed),
``feature_shift`` (``||F(y^) - F(y)||^2`` on ``F = model.embed``), and, of the clean query's soft
assignment at the attack's temperature, ``peak_probability_clean`` and ``entropy_clean`` (each
averaged over the M codebooks). On a ranker without codebooks (Basic only) the metrics are
``ap`` / ``ap_clean`` under ``code_distance`` and ``feature_shift``.
AP is over the whole ranking by default (``topk=None``), else AP@topk (the hashing literature's
mAP@topk, normalized by the relevant items among the first ``topk``); ties are broken by database
index. Both are :func:`retrieval.average_precision.average_precision` (float32), on the ranking by
the distances as the model returns them (no cast).

Defaults are the paper's settings ("Implementations"): eps = 8/255, step 0.01, 5 iterations.
Departures from the paper, and why:

- ``random_start=True`` by default: the paper's PGD is AdverTorch's ``LinfPGDAttack``, whose
  default is a uniform random start; and the Basic loss has a zero gradient at ``y^ = y``, so
  without one Basic would never move. The start is keyed per query index (batch-independent).
- the soft assignment uses the model's temperature ``alpha`` (``temperature`` overrides it);
  Eq. 7 has none (alpha = 1). On a DPQN trained with ``alpha`` that is the model's own
  distribution; with alpha = 1 the clean distribution of AOD would be nearly uniform over the
  codewords (cosines lie in [-1, 1]) and AOD would lose its "push away from every
  high-probability codeword" meaning.
- for k-means PQ the similarity is ``-||z_m - c_mk||^2`` instead of Eq. 7's inner product, so
  that the distribution's peak is the stored (Eq. 1) code; see
  :mod:`lightning_modules.soft_product_quantizer`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from robust_ranking.attacks.attack import Attack, AttackResult, NotApplicableError
from robust_ranking.attacks.gallery import Gallery
from robust_ranking.lightning_modules.capabilities import ProductQuantizationRanker
from robust_ranking.retrieval.average_precision import average_precision, ranked_relevance

__all__ = ["PQAGAttack", "query_average_precision"]

_NAMES = {"basic": "PQ-AG:Basic", "apd": "PQ-AG:APD", "aod": "PQ-AG:AOD"}


class PQAGAttack(Attack):
    """PQ-AG adversarial query generation: ``variant`` selects the loss (Eq. 3, 8 or 9).

    Args:
        variant: ``"basic"`` (deep-feature separation, Eq. 3), ``"apd"`` (attack on the peak of
            the centroid distribution, type I, Eq. 8) or ``"aod"`` (attack on the overall
            centroid distribution, type II, Eq. 9). APD and AOD need the model capability
            ``codebooks``; Basic runs on any ranker.
        eps: L-inf budget in pixel units (paper: 8/255).
        alpha: PGD step (paper's "learning rate": 0.01).
        steps: PGD iterations (paper: 5).
        random_start: uniform start in the eps-ball, keyed per query index (default on).
        seed: seed of the random start.
        temperature: soft-assignment temperature for APD / AOD; ``None`` = the model's ``alpha``.
        topk: AP over the first ``topk`` results; ``None`` = the whole ranking.
    """

    def __init__(
        self,
        variant: Literal["basic", "apd", "aod"],
        eps: float = 8.0 / 255.0,
        alpha: float | None = 0.01,
        steps: int | None = 5,
        random_start: bool = True,
        seed: int = 0,
        temperature: float | None = None,
        topk: int | None = None,
    ) -> None:
        if variant not in _NAMES:
            raise ValueError(f"variant must be one of {sorted(_NAMES)}, got {variant!r}")
        super().__init__(eps, alpha=alpha, steps=steps, random_start=random_start, seed=seed)
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                        or not temperature > 0):
            raise ValueError(f"temperature must be a number > 0 or None, got {temperature!r}")
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
            raise ValueError(f"topk must be an integer >= 1 or None, got {topk!r}")
        self.variant = variant
        self.temperature = None if temperature is None else float(temperature)
        self.topk = topk

    @property
    def name(self) -> str:  # type: ignore[override]
        return _NAMES[self.variant]

    needs_query_labels = True

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset() if self.variant == "basic" else frozenset({"codebooks"})

    def check_applicable(self, model: nn.Module) -> None:
        """APD / AOD differentiate the soft assignment: the model must be a ProductQuantizationRanker."""
        super().check_applicable(model)
        if self.variant != "basic" and not isinstance(model, ProductQuantizationRanker):
            raise NotApplicableError(f"{self.name} needs a lightning_modules.ProductQuantizationRanker (codebooks and "
                                     f"soft_assignment), which {type(model).__name__} is not")

    @property
    def hparams(self) -> dict:
        return {**super().hparams, "variant": self.variant, "temperature": self.temperature, "topk": self.topk}

    # ------------------------------------------------------------------ losses
    def _loss(self, model: nn.Module, images: Tensor):
        """The per-query loss ``x_adv -> [B]`` of the variant, given the clean queries."""
        with torch.no_grad():
            clean = model.embed(images)
        if self.variant == "basic":  # Eq. 3
            return lambda x: -(model.embed(x) - clean).pow(2).sum(-1)
        with torch.no_grad():
            p_clean = model.soft_assignment(clean, self.temperature)  # [B, M, K]
        if self.variant == "apd":  # Eq. 8: one-hot of the clean hard code b_m (Eq. 6)
            target = torch.zeros_like(p_clean).scatter_(-1, model.encode(images).unsqueeze(-1), 1.0)
        else:  # Eq. 9: the whole clean distribution
            target = p_clean

        def loss(x: Tensor) -> Tensor:
            # log-softmax, not log(softmax): AOD weights every codeword, and a probability that
            # underflows to 0 would give 0 * log 0 = nan.
            return (target * model.log_soft_assignment(model.embed(x), self.temperature)).sum(dim=(-1, -2))

        return loss

    def perturb(self, model: nn.Module, gallery: Gallery, images: Tensor, sample_indices: Tensor,
                query_labels: Tensor | None = None) -> AttackResult:
        """Attack the queries ``images`` (query-set indices ``sample_indices``, labels ``query_labels``)
        against the database ``gallery`` (codes from ``model.encode``)."""
        labels = query_labels
        adversarial = self.pgd(self._loss(model, images), images, sample_indices)
        with torch.no_grad():  # one encode and one embed per image set, shared by every metric
            adv_codes, clean_codes = model.encode(adversarial), model.encode(images)
            adv_features, clean_features = model.embed(adversarial), model.embed(images)
            pq = "codebooks" in model.capabilities
            adv = _average_precisions(model, gallery, adv_codes, adv_features if pq else None, labels, self.topk)
            clean = _average_precisions(model, gallery, clean_codes, clean_features if pq else None, labels,
                                        self.topk)
        metrics: dict[str, Tensor] = {}
        for key in adv:
            metrics[key], metrics[f"{key}_clean"] = adv[key], clean[key]
        # How far the attack moved the query's deep feature: separates "moved little" from "moved
        # but kept the codes" (docs/results/pq_ag.md, "Does the paper's ordering hold?").
        metrics["feature_shift"] = (adv_features - clean_features).pow(2).flatten(1).sum(-1)
        if pq:
            metrics["code_change"] = (adv_codes != clean_codes).float().mean(-1)
            metrics.update(_assignment_statistics(model, clean_features, self.temperature))
        return AttackResult(adversarial=adversarial, perturbation=adversarial - images, metrics=metrics)


@torch.no_grad()
def _assignment_statistics(model: nn.Module, features: Tensor, temperature: float | None) -> dict[str, Tensor]:
    """Per query, how peaked the clean soft assignment is (what AOD's target looks like): the peak
    probability and the entropy (nats), each averaged over the M codebooks, at the attack's temperature."""
    p = model.soft_assignment(features, temperature)  # [B, M, K]
    return {"peak_probability_clean": p.max(-1).values.mean(-1),
            "entropy_clean": -(p * p.clamp_min(1e-30).log()).sum(-1).mean(-1)}


@torch.no_grad()
def query_average_precision(
    model: nn.Module, gallery: Gallery, images: Tensor, labels: Tensor, topk: int | None = None
) -> dict[str, Tensor]:
    """Per-query AP of ``images`` (labels ``labels [B]``) against the database ``gallery``.

    PQ rankers (capability ``codebooks``; ``gallery.embeddings`` are database codes):
    ``{"ap_sdc", "ap_adc"}`` -- SDC ranks by ``model.sdc_distance(model.encode(x), codes)``, ADC
    by ``model.adc_distance(model.embed(x), codes)``. Other rankers: ``{"ap"}`` under
    ``model.code_distance(model.encode(x), gallery.embeddings)``. The ranking is stable (ties by
    database index), cut at ``topk`` when given (AP@topk, normalized by the relevant items among
    the first ``topk``: :func:`retrieval.average_precision.average_precision`, float32). Also
    used to measure transfer:
    adversarial queries crafted on one model, ranked by another.
    """
    features = model.embed(images) if "codebooks" in model.capabilities else None
    return _average_precisions(model, gallery, model.encode(images), features, labels, topk)


def _average_precisions(
    model: nn.Module, gallery: Gallery, codes: Tensor, features: Tensor | None, labels: Tensor, topk: int | None
) -> dict[str, Tensor]:
    """:func:`query_average_precision` from the queries' codes (and, for PQ, features)."""
    db, db_labels = gallery.embeddings, gallery.labels

    def ap(distances: Tensor) -> Tensor:  # AP (topk=None) or AP@topk; cut before gathering labels
        return average_precision(ranked_relevance(distances, labels, db_labels, topk=topk))

    if features is None:
        return {"ap": ap(model.code_distance(codes, db))}
    return {"ap_sdc": ap(model.sdc_distance(codes, db)), "ap_adc": ap(model.adc_distance(features, db))}
