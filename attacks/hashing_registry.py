"""The deep-hashing attacks in the evaluation engine's registry (:data:`attacks.attack_registry.ATTACKS`).

Suite names (``configs/suites/sdha_*.yaml``): ``SDHA``, ``SDHA-UW``, ``HAG`` (untargeted) and
``SDHA-T``, ``SDHA-UW-T``, ``DHTA`` (targeted; the suite entry must give ``target_label``, an int
or ``random``). All run under the query / database protocol (the engine attacks the first T of a
seeded permutation of the query set against the database's sign codes and passes
``query_labels``) and need the ``hash_bits`` capability.

Reported per query and averaged by the engine: ``ap`` (AP@topk after the attack, the table
metric, so the mean is the mAP), ``ap_clean``, ``l2``, ``l2_at_target`` (mean over the queries
that reached the AP bound), ``success`` (fraction that did) and ``iterations``; SDHA also
``lagrange`` (alpha * K, per query when ``search_steps`` > 1) and ``search_iterations`` (the
iterations of all its binary-search runs). The workload-level
"l2 at a preset mAP" of SDHA Tables 2-4 needs the per-iteration traces, which the engine does not
gather: ``scripts/sdha_tables.py`` produces those tables (docs/dch.md).

Suite options: every constructor argument of the attack (``steps``, ``lr``, ``lagrange``,
``sigma``, ``z``, ``search_steps``, ``momentum``, ``threshold``, ``n_f``, ``topk``, ``check_every``,
``early_stop``, ``goal_ap``, ``target_label``); the common ``alpha`` is the step size (``lr``); ``random_start`` must be false
(the attacks start at the clean query, as the paper). ``tanh_scale_factor`` (> 0) multiplies the
paper's gamma schedule: a per-model constant for hash layers whose logits are far from the scale
the schedule assumes (:func:`attacks.hashing_attack.logit_scale_factor`; ``scripts/sdha_tables.py
--tanh-scale-factor auto`` prints it per model).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attacks.attack import Attack
from attacks.attack_registry import ATTACKS, AttackRegistry
from attacks.dhta_attack import DHTAAttack
from attacks.hag_attack import HAGAttack
from attacks.hashing_attack import scaled_tanh_scales
from attacks.sdha_attack import SDHAAttack

__all__ = ["HASHING_METRICS", "SDHA_METRICS", "register_hashing_attacks"]

HASHING_METRICS = ("ap", "ap_clean", "l2", "l2_at_target", "success", "iterations")
SDHA_METRICS = (*HASHING_METRICS, "lagrange", "search_iterations")
_COMMON = {"lr", "topk", "check_every", "early_stop", "goal_ap", "tanh_scale_factor"}
_SDHA_OPTIONS = _COMMON | {"lagrange", "sigma", "z", "search_steps"}


def _options(options: dict[str, Any]) -> dict[str, Any]:
    options = dict(options)
    if options.pop("random_start", False):
        raise ValueError("the hashing attacks start at the clean query; random_start must be false")
    if "alpha" in options:  # the engine's common step-size key
        options["lr"] = options.pop("alpha")
    if "tanh_scale_factor" in options:
        options["tanh_scales"] = scaled_tanh_scales(options.pop("tanh_scale_factor"))
    return options


def _sdha(targeted: bool, unweighted: bool) -> Callable[..., Attack]:
    def factory(eps: float, size: int | None, seed: int, **options: Any) -> Attack:
        options = _options(options)
        target = options.pop("target_label", None)
        if unweighted:
            options["z"] = 0.0
        return SDHAAttack(targeted, target, eps=eps, seed=seed, **options)

    return factory


def _hag(eps: float, size: int | None, seed: int, **options: Any) -> Attack:
    return HAGAttack(eps=eps, seed=seed, **_options(options))


def _dhta(eps: float, size: int | None, seed: int, **options: Any) -> Attack:
    options = _options(options)
    return DHTAAttack(options.pop("target_label", None), eps=eps, seed=seed, **options)


def register_hashing_attacks(registry: AttackRegistry = ATTACKS) -> None:
    """Add the six hashing attack names to ``registry`` (done for :data:`ATTACKS` on import)."""
    common = {"needs": {"hash_bits"}, "metric": "ap", "metrics": HASHING_METRICS, "clean_metric": "ap_clean",
              "protocol": "query_database"}
    sdha = {**common, "metrics": SDHA_METRICS}
    # Untargeted attacks lower the AP towards 0: the score's "+" term ap / ap_clean applies.
    # Targeted ones are left out of the score (its "-" term assumes ranks in percent).
    registry.register("SDHA", _sdha(False, False), options=_SDHA_OPTIONS, direction="+", **sdha,
                      description="SDHA untargeted: l2 + alpha * weighted surrogate Hamming (ICMR 2021 Eq. 1, 6)")
    registry.register("SDHA-UW", _sdha(False, True), options=_SDHA_OPTIONS - {"z"}, direction="+", **sdha,
                      description="SDHA untargeted without the AP-oriented weights (ICMR 2021 Sec. 5.1)")
    registry.register("HAG", _hag, options=_COMMON | {"momentum", "threshold"}, direction="+", **common,
                      description="HAG: push the code away from the query's own code (Yang et al. 2020)")
    registry.register("SDHA-T", _sdha(True, False), options=_SDHA_OPTIONS | {"target_label"}, **sdha,
                      description="SDHA targeted (ICMR 2021 Eq. 1, 7); target_label: int or random")
    registry.register("SDHA-UW-T", _sdha(True, True), options=(_SDHA_OPTIONS - {"z"}) | {"target_label"},
                      **sdha, description="SDHA targeted without the AP-oriented weights")
    registry.register("DHTA", _dhta, options=_COMMON | {"n_f", "target_label"}, **common,
                      description="DHTA: move the code to the target class's anchor code (Bai et al. 2020)")


register_hashing_attacks()
