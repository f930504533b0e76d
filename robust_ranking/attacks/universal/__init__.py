"""Universal perturbations: I-CA / I-QA (ECCV 2020 Sec. 5.2, Table 6) and UAP for retrieval with label-,
pair- and list-wise objectives and random resizing (Li et al., ICCV 2019).
"""

from robust_ranking.attacks.universal.universal_ranking_attack import (
    UniversalRankingAttack,
    UniversalRankingResult,
    check_schedule,
    fit_unseen_split,
    perturbation_image,
)
from robust_ranking.attacks.universal.uap_retrieval import UAPRetrieval, UAPRetrievalResult, resize_perturbation, retrieval_metrics

__all__ = [
    "UAPRetrieval",
    "UAPRetrievalResult",
    "UniversalRankingAttack",
    "UniversalRankingResult",
    "check_schedule",
    "fit_unseen_split",
    "perturbation_image",
    "resize_perturbation",
    "retrieval_metrics",
]
