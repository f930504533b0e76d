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

Robustness evaluation (suites, engine, score, reports; see docs/evaluation.md)::

    results = RobustnessEvaluator(Suite.from_yaml("configs/suites/quick.yaml")).run(model, dm.eval_set)
    Report.from_results(results).to_markdown()
"""

from attacks.attack import Attack, AttackResult, NotApplicableError, frozen_eval
from attacks.attack_registry import ATTACKS, AttackEntry, AttackRegistry
from attacks.candidate_attack import CandidateAttack
from attacks.gallery import Gallery
from attacks.max_shift_attack import MaxShiftAttack, embedding_shift, max_shift_perturb
from attacks.pgd import eccv_step_rules, pgd_linf, project_linf
from attacks.query_attack import QueryAttack
from attacks.ranks import normalized_rank
from attacks.report import Report
from attacks.robustness_evaluator import (
    Collectives,
    ConfigResult,
    RobustnessEvaluator,
    RobustnessResults,
    SkippedAttack,
    StrategyCollectives,
)
from attacks.robustness_score import RobustnessScore
from attacks.selection import keyed_uniform, keys, nearest_excluding, random_targets, top_percent_targets
from attacks.suite import AttackConfig, AttackSpec, Suite, SuiteError

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackConfig",
    "AttackEntry",
    "AttackRegistry",
    "AttackSpec",
    "Collectives",
    "ConfigResult",
    "Report",
    "RobustnessEvaluator",
    "RobustnessResults",
    "RobustnessScore",
    "SkippedAttack",
    "StrategyCollectives",
    "Suite",
    "SuiteError",
    "AttackResult",
    "CandidateAttack",
    "Gallery",
    "MaxShiftAttack",
    "NotApplicableError",
    "QueryAttack",
    "eccv_step_rules",
    "embedding_shift",
    "frozen_eval",
    "keyed_uniform",
    "keys",
    "max_shift_perturb",
    "nearest_excluding",
    "normalized_rank",
    "pgd_linf",
    "project_linf",
    "random_targets",
    "top_percent_targets",
]

# PQ-AG attacks on product quantization (docs/dpqn.md)
from attacks.pq_ag_attack import PQAGAttack, query_average_precision  # noqa: E402

__all__ += ["PQAGAttack", "query_average_precision"]

# Deep-hashing attacks, SDHA (ICMR 2021) and its baselines (docs/dch.md)
from attacks.attack_trace import AttackTrace  # noqa: E402
from attacks.dhta_attack import DHTAAttack  # noqa: E402
from attacks.hag_attack import HAGAttack  # noqa: E402
from attacks.hashing_attack import HashingAttack, HashingAttackResult, logit_scale_factor  # noqa: E402
from attacks.sdha_attack import SDHAAttack  # noqa: E402

__all__ += ["AttackTrace", "DHTAAttack", "HAGAttack", "HashingAttack", "HashingAttackResult", "SDHAAttack", "logit_scale_factor"]
from attacks.hashing_registry import register_hashing_attacks  # noqa: E402  (registers SDHA, HAG, DHTA ...)

__all__ += ["register_hashing_attacks"]

# Universal perturbations (I-CA / I-QA, UAP-IR) and transfer attacks (docs/universal.md)
from attacks.transfer import TransferResult, transfer_attack, transfer_markdown, transfer_matrix  # noqa: E402
from attacks.uap_retrieval import UAPRetrieval, UAPRetrievalResult, resize_perturbation  # noqa: E402
from attacks.universal_ranking_attack import (  # noqa: E402
    UniversalRankingAttack,
    UniversalRankingResult,
    fit_unseen_split,
)

__all__ += [
    "TransferResult",
    "UAPRetrieval",
    "UAPRetrievalResult",
    "UniversalRankingAttack",
    "UniversalRankingResult",
    "fit_unseen_split",
    "resize_perturbation",
    "transfer_attack",
    "transfer_markdown",
    "transfer_matrix",
]
# Universal suites (kind: universal) and their registry; the shared fit-schedule validation.
from attacks.attack_registry import UNIVERSAL_ATTACKS  # noqa: E402
from attacks.suite import SUITE_KINDS  # noqa: E402
from attacks.universal_ranking_attack import check_schedule  # noqa: E402

__all__ += ["SUITE_KINDS", "UNIVERSAL_ATTACKS", "check_schedule"]

# PQ-AG in the evaluation engine's registry (docs/dpqn.md)
from attacks.pq_ag_registry import register_pq_ag_attacks  # noqa: E402  (registers PQ-AG:Basic / APD / AOD)

__all__ += ["register_pq_ag_attacks"]
