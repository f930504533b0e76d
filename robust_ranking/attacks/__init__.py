"""Adversarial attacks on deep rankers (flat re-exports).

ECCV 2020 ranking attacks (Zhou et al., "Adversarial Ranking Attack and Defense"):
:class:`CandidateAttack` (CA+/CA-), :class:`QueryAttack` (QA+/QA- with the SP term),
:class:`MaxShiftAttack` (ES) and :func:`max_shift_perturb` for adversarial training; the
shared PGD (:func:`pgd_linf`, :func:`eccv_step_rules`), per-sample-index target selection and
the normalized rank metric.

Usage::

    gallery = Gallery(embeddings=model.embed(X).detach(), labels=y)   # once per checkpoint
    result = CandidateAttack("+", w=1, eps=0.03)(model, gallery, X[idx], idx)
    result.metrics["rank"]        # [B] normalized ranks in percent

This package holds attack algorithms only; suites, the registry, the engine, scores and reports
are in :mod:`evaluation` (docs/evaluation.md).
"""

from robust_ranking.attacks.attack import Attack, AttackResult, NotApplicableError, frozen_eval
from robust_ranking.attacks.hashing.attack_trace import AttackTrace
from robust_ranking.attacks.ranking.candidate_attack import CandidateAttack
from robust_ranking.attacks.hashing.dhta_attack import DHTAAttack
from robust_ranking.attacks.gallery import Gallery, QuerySet
from robust_ranking.attacks.hashing.hag_attack import HAGAttack
from robust_ranking.attacks.hashing.hashing_attack import HashingAttack, HashingAttackResult, logit_scale_factor
from robust_ranking.attacks.ranking.max_shift_attack import MaxShiftAttack, embedding_shift, max_shift_perturb
from robust_ranking.attacks.pgd import eccv_step_rules, pgd_linf, project_linf
from robust_ranking.attacks.quantization.pq_ag_attack import PQAGAttack, query_average_precision
from robust_ranking.attacks.ranking.query_attack import QueryAttack
from robust_ranking.attacks.ranks import normalized_rank
from robust_ranking.attacks.hashing.sdha_attack import SDHAAttack
from robust_ranking.attacks.selection import keyed_uniform, keys, nearest_excluding, random_targets, top_percent_targets
from robust_ranking.attacks.transfer import TransferResult, transfer_attack, transfer_markdown, transfer_matrix
from robust_ranking.attacks.universal.uap_retrieval import UAPRetrieval, UAPRetrievalResult, resize_perturbation
from robust_ranking.attacks.universal.universal_ranking_attack import (
    UniversalRankingAttack,
    UniversalRankingResult,
    check_schedule,
    fit_unseen_split,
)

__all__ = [
    "Attack",
    "AttackResult",
    "AttackTrace",
    "CandidateAttack",
    "DHTAAttack",
    "Gallery",
    "HAGAttack",
    "HashingAttack",
    "HashingAttackResult",
    "MaxShiftAttack",
    "NotApplicableError",
    "PQAGAttack",
    "QueryAttack",
    "QuerySet",
    "SDHAAttack",
    "TransferResult",
    "UAPRetrieval",
    "UAPRetrievalResult",
    "UniversalRankingAttack",
    "UniversalRankingResult",
    "check_schedule",
    "eccv_step_rules",
    "embedding_shift",
    "fit_unseen_split",
    "frozen_eval",
    "keyed_uniform",
    "keys",
    "logit_scale_factor",
    "max_shift_perturb",
    "nearest_excluding",
    "normalized_rank",
    "pgd_linf",
    "project_linf",
    "query_average_precision",
    "random_targets",
    "resize_perturbation",
    "top_percent_targets",
    "transfer_attack",
    "transfer_markdown",
    "transfer_matrix",
]
