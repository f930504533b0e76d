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
