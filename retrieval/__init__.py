"""Retrieval evaluation: ranking/clustering metrics and exact search indexes."""

# Import order matters: ``metrics`` re-exports ``RetrievalMetrics`` from ``retrieval_metrics``,
# which itself imports functions from ``metrics``; importing ``metrics`` first resolves the cycle.
from retrieval.metrics import (
    deduplicate_by_index,
    evaluate_retrieval,
    kmeans_nmi,
    map_at_r,
    mean_average_precision,
    normalized_mutual_info,
    rank_gallery,
    recall_at_k,
)
from retrieval.retrieval_metrics import RetrievalMetrics
from retrieval.index import (
    FaissFlatIndex,
    RetrievalIndex,
    TorchFlatIndex,
    faiss_gpu_available,
    stable_topk,
)

__all__ = [
    "FaissFlatIndex",
    "RetrievalIndex",
    "RetrievalMetrics",
    "TorchFlatIndex",
    "deduplicate_by_index",
    "evaluate_retrieval",
    "faiss_gpu_available",
    "kmeans_nmi",
    "map_at_r",
    "mean_average_precision",
    "normalized_mutual_info",
    "rank_gallery",
    "recall_at_k",
    "stable_topk",
]

# Hamming search and hashing metrics (docs/dch.md)
from retrieval.hamming_index import HammingIndex  # noqa: E402
from retrieval.hashing_metrics import (  # noqa: E402
    evaluate_hashing,
    hamming_distance,
    hamming_pr_curve,
    map_within_hamming_radius,
    pack_codes,
    packed_hamming_distance,
    sign_codes,
    unpack_codes,
)

__all__ += [
    "HammingIndex",
    "evaluate_hashing",
    "hamming_distance",
    "hamming_pr_curve",
    "map_within_hamming_radius",
    "pack_codes",
    "packed_hamming_distance",
    "sign_codes",
    "unpack_codes",
]

# Product-quantization search, SDC / ADC (docs/dpqn.md)
from retrieval.pq_index import PQIndex, faiss_pq_supported, pack_pq_codes  # noqa: E402
from retrieval.pq_search import adc_distance, decode_codes, sdc_distance, sdc_table  # noqa: E402

__all__ += ["PQIndex", "adc_distance", "decode_codes", "faiss_pq_supported", "pack_pq_codes", "sdc_distance",
            "sdc_table"]

# Query / database metrics of the hashing and quantization literature
from retrieval.topk_metrics import (  # noqa: E402
    average_precision_at_topk,
    evaluate_query_database,
    map_at_topk,
    precision_recall_at_cutoffs,
)

__all__ += ["average_precision_at_topk", "evaluate_query_database", "map_at_topk", "precision_recall_at_cutoffs"]
