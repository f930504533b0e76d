"""Ranking attacks of Zhou et al., "Adversarial Ranking Attack and Defense", ECCV 2020: the candidate
attack CA+/CA- (Eq. 4, 7), the query attack QA+/QA- with the semantics-preserving term (Eq. 9-12) and
the maximum embedding shift ES (Sec. 3.3), also used to craft the defense's training examples (Eq. 13);
and the other attacks of RobRank's ERS (Zhou et al., "Adversarial Attack and Defense in Deep Ranking",
IEEE TPAMI, arXiv 2106.03614): TMA, ES:R, LTM, GTM, GTT.
"""

from robust_ranking.attacks.ranking.candidate_attack import CandidateAttack
from robust_ranking.attacks.ranking.query_attack import QueryAttack
from robust_ranking.attacks.ranking.max_shift_attack import MaxShiftAttack, embedding_shift, max_shift_perturb
from robust_ranking.attacks.ranking.es_recall_attack import EmbeddingShiftRecallAttack
from robust_ranking.attacks.ranking.gtm_attack import GreedyTop1MisrankAttack
from robust_ranking.attacks.ranking.gtt_attack import GreedyTop1TranslocationAttack
from robust_ranking.attacks.ranking.ltm_attack import LearningToMisrankAttack
from robust_ranking.attacks.ranking.tma_attack import TargetedMismatchAttack

__all__ = [
    "CandidateAttack",
    "EmbeddingShiftRecallAttack",
    "GreedyTop1MisrankAttack",
    "GreedyTop1TranslocationAttack",
    "LearningToMisrankAttack",
    "MaxShiftAttack",
    "QueryAttack",
    "TargetedMismatchAttack",
    "embedding_shift",
    "max_shift_perturb",
]
