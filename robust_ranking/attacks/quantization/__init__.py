"""PQ-AG attacks on deep product quantization networks (Feng et al., AAAI 2020): Basic, APD (type I)
and AOD (type II).
"""

from robust_ranking.attacks.quantization.pq_ag_attack import PQAGAttack, query_average_precision

__all__ = [
    "PQAGAttack",
    "query_average_precision",
]
