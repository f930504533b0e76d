"""The PQ-AG attacks in the evaluation engine's registry (:data:`attacks.attack_registry.ATTACKS`).

Suite names (``configs/suites/pqag_table.yaml``): ``PQ-AG:Basic``, ``PQ-AG:APD``, ``PQ-AG:AOD``
(Feng et al., AAAI 2020, Eqs. 3, 8, 9; :class:`attacks.pq_ag_attack.PQAGAttack`). They run under
the query / database protocol: the engine attacks the first T of a seeded permutation of the
query set against the database's hard PQ codes (``model.encode``) and passes ``query_labels``.

All three entries need the ``codebooks`` capability: the PQ-AG table measures mAP under SDC and
ADC, which only PQ rankers define (the :class:`PQAGAttack` class itself runs Basic on any
ranker). Reported per query and averaged by the engine: ``ap_sdc`` (the table metric),
``ap_sdc_clean``, ``ap_adc``, ``ap_adc_clean`` and ``code_change``. They lower AP towards 0, so
the robustness score's ``"+"`` term (``ap_sdc / ap_sdc_clean``) applies.

Suite options: the common ``alpha`` (PGD step; paper 0.01), ``steps`` (paper 5) and
``random_start`` (default true), plus ``temperature`` and ``topk``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attacks.attack import Attack
from attacks.attack_registry import ATTACKS, AttackRegistry
from attacks.pq_ag_attack import PQAGAttack

__all__ = ["PQ_AG_METRICS", "register_pq_ag_attacks"]

PQ_AG_METRICS = ("ap_sdc", "ap_sdc_clean", "ap_adc", "ap_adc_clean", "code_change")

_DESCRIPTIONS = {
    "basic": "PQ-AG Basic: push the query's deep feature away (AAAI 2020 Eq. 3)",
    "apd": "PQ-AG APD, type I: cross-entropy against the clean peak codewords (AAAI 2020 Eq. 8)",
    "aod": "PQ-AG AOD, type II: against the whole clean codeword distribution (AAAI 2020 Eq. 9)",
}


def _factory(variant: str) -> Callable[..., Attack]:
    def factory(eps: float, size: int | None, seed: int, **options: Any) -> Attack:
        # The paper's step (0.01) and iterations (5) unless the suite says otherwise.
        options.setdefault("alpha", 0.01)
        options.setdefault("steps", 5)
        return PQAGAttack(variant, eps=eps, seed=seed, **options)  # type: ignore[arg-type]

    return factory


def register_pq_ag_attacks(registry: AttackRegistry = ATTACKS) -> None:
    """Add ``PQ-AG:Basic`` / ``PQ-AG:APD`` / ``PQ-AG:AOD`` to ``registry`` (done for
    :data:`ATTACKS` on import)."""
    for variant, label in (("basic", "Basic"), ("apd", "APD"), ("aod", "AOD")):
        if f"PQ-AG:{label}" in registry:
            continue
        registry.register(
            f"PQ-AG:{label}", _factory(variant), options={"temperature", "topk"}, needs={"codebooks"},
            metric="ap_sdc", metrics=PQ_AG_METRICS, clean_metric="ap_sdc_clean", direction="+",
            protocol="query_database", description=_DESCRIPTIONS[variant],
        )


register_pq_ag_attacks()
