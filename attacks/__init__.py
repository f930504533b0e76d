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
"""

from attacks.attack import Attack, AttackResult, NotApplicableError, frozen_eval
from attacks.candidate_attack import CandidateAttack
from attacks.gallery import Gallery
from attacks.max_shift_attack import MaxShiftAttack, embedding_shift, max_shift_perturb
from attacks.pgd import eccv_step_rules, pgd_linf, project_linf
from attacks.query_attack import QueryAttack
from attacks.ranks import normalized_rank
from attacks.selection import keyed_uniform, keys, nearest_excluding, random_targets, top_percent_targets

__all__ = [
    "Attack",
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
