"""Attacks on deep hashing: SDHA (Lu et al., ICMR 2021) and its baselines HAG and DHTA, the shared
HashingAttack loop (gamma schedule, early stop at a goal AP) and per-iteration traces.
"""

from robust_ranking.attacks.hashing.hashing_attack import (
    HashingAttack,
    HashingAttackResult,
    HashingContext,
    PAPER_TANH_SCALES,
    logit_scale_factor,
    scaled_tanh_scales,
)
from robust_ranking.attacks.hashing.sdha_attack import SDHAAttack
from robust_ranking.attacks.hashing.hag_attack import HAGAttack
from robust_ranking.attacks.hashing.dhta_attack import DHTAAttack
from robust_ranking.attacks.hashing.surrogate_hamming import ap_weights, surrogate_hamming, surrogate_terms, weighted_surrogate_sum
from robust_ranking.attacks.hashing.attack_trace import AttackTrace

__all__ = [
    "AttackTrace",
    "DHTAAttack",
    "HAGAttack",
    "HashingAttack",
    "HashingAttackResult",
    "HashingContext",
    "PAPER_TANH_SCALES",
    "SDHAAttack",
    "ap_weights",
    "logit_scale_factor",
    "scaled_tanh_scales",
    "surrogate_hamming",
    "surrogate_terms",
    "weighted_surrogate_sum",
]
