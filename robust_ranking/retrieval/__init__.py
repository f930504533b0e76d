"""Retrieval evaluation: ranking/clustering metrics and exact search indexes.

Flat re-exports of the package's public names. The modules import in one direction only (no
cycles, so the order below is free; checked by ``tests/retrieval/test_retrieval_imports.py``):

- ``average_precision``: functional AP (full ranking, AP@k, AP@R) and stable ranking; imports
  nothing from the package. Every metric and attack that needs AP calls it.
- ``metrics`` (Recall@k, mAP, MAP@R, NMI; query set = gallery) and ``topk_metrics`` (query /
  database mAP@topk, PR curves) import it; ``retrieval_metrics`` (the ``torchmetrics`` class)
  imports ``metrics``; ``hashing_metrics`` imports ``topk_metrics``.
- search: ``index`` (imports nothing from the package; the metrics import its large-gallery
  helpers), ``hamming_index`` (imports ``hashing_metrics``, which imports it back lazily inside
  ``evaluate_hashing``), ``pq_search``, ``pq_index``.
"""

from robust_ranking.retrieval.average_precision import average_precision, average_precisions, ranked_relevance, stable_ranking
from robust_ranking.retrieval.hamming_index import HammingIndex
from robust_ranking.retrieval.hashing_metrics import (
    evaluate_hashing,
    hamming_distance,
    hamming_pr_curve,
    map_within_hamming_radius,
    pack_codes,
    packed_hamming_distance,
    sign_codes,
    unpack_codes,
)
from robust_ranking.retrieval.index import (
    FAISS_MIN_GALLERY,
    GPU_MAX_K,
    MAX_BLOCK_ELEMENTS,
    FaissFlatIndex,
    RetrievalIndex,
    TorchFlatIndex,
    faiss_gpu_available,
    faiss_stable_search,
    query_chunk_rows,
    search_backend,
    stable_topk,
)
from robust_ranking.retrieval.metrics import (
    deduplicate_by_index,
    evaluate_retrieval,
    kmeans_nmi,
    map_at_r,
    mean_average_precision,
    normalized_mutual_info,
    rank_gallery,
    recall_at_k,
)
from robust_ranking.retrieval.pq_index import PQIndex, faiss_pq_supported, pack_pq_codes
from robust_ranking.retrieval.pq_search import adc_distance, decode_codes, sdc_distance, sdc_table
from robust_ranking.retrieval.retrieval_metrics import RetrievalMetrics
from robust_ranking.retrieval.topk_metrics import (
    average_precision_at_topk,
    evaluate_query_database,
    map_at_topk,
    precision_recall_at_cutoffs,
)

__all__ = [
    # functional average precision and stable ranking (retrieval.average_precision)
    "average_precision",
    "average_precisions",
    "ranked_relevance",
    "stable_ranking",
    # query set = gallery metrics (retrieval.metrics) and their torchmetrics class
    "RetrievalMetrics",
    "deduplicate_by_index",
    "evaluate_retrieval",
    "kmeans_nmi",
    "map_at_r",
    "mean_average_precision",
    "normalized_mutual_info",
    "rank_gallery",
    "recall_at_k",
    # query / database metrics of the hashing and quantization literature (retrieval.topk_metrics)
    "average_precision_at_topk",
    "evaluate_query_database",
    "map_at_topk",
    "precision_recall_at_cutoffs",
    # Hamming search and hashing metrics (docs/dch.md)
    "HammingIndex",
    "evaluate_hashing",
    "hamming_distance",
    "hamming_pr_curve",
    "map_within_hamming_radius",
    "pack_codes",
    "packed_hamming_distance",
    "sign_codes",
    "unpack_codes",
    # exact search indexes and the large-gallery (faiss) path (retrieval.index)
    "FAISS_MIN_GALLERY",
    "GPU_MAX_K",
    "MAX_BLOCK_ELEMENTS",
    "FaissFlatIndex",
    "RetrievalIndex",
    "TorchFlatIndex",
    "faiss_gpu_available",
    "faiss_stable_search",
    "query_chunk_rows",
    "search_backend",
    "stable_topk",
    # product-quantization search, SDC / ADC (docs/dpqn.md)
    "PQIndex",
    "adc_distance",
    "decode_codes",
    "faiss_pq_supported",
    "pack_pq_codes",
    "sdc_distance",
    "sdc_table",
]
