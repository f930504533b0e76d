"""Ranking attacks of Zhou et al., "Adversarial Ranking Attack and Defense", ECCV 2020: the candidate
attack CA+/CA- (Eq. 4, 7), the query attack QA+/QA- with the semantics-preserving term (Eq. 9-12) and
the maximum embedding shift ES (Sec. 3.3), also used to craft the defense's training examples (Eq. 13).
"""

from robust_ranking.attacks.ranking.candidate_attack import CandidateAttack
from robust_ranking.attacks.ranking.query_attack import QueryAttack
from robust_ranking.attacks.ranking.max_shift_attack import MaxShiftAttack, embedding_shift, max_shift_perturb

__all__ = [
    "CandidateAttack",
    "MaxShiftAttack",
    "QueryAttack",
    "embedding_shift",
    "max_shift_perturb",
]
