"""``torchmetrics`` wrapper around :func:`retrieval.metrics.evaluate_retrieval`.

Why not torchmetrics' own retrieval metrics: they score each (query, item) pair by a
*similarity* and treat non-positive scores as irrelevant, need the full pair list, and have no
notion of "query set = gallery" with self exclusion. Here the states are the raw codes, and the
ranking is recomputed from the distance callable at :meth:`RetrievalMetrics.compute` time.

Import direction (torchmetrics style): this class module imports the functional
:mod:`retrieval.metrics` (whose AP comes from :mod:`retrieval.average_precision`); neither imports
it back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from robust_ranking.retrieval.metrics import deduplicate_by_index, evaluate_retrieval


class RetrievalMetrics(Metric):
    """Recall@k, mAP, MAP@R and k-means NMI of an evaluation split used as its own gallery.

    Every sample is a query against all the others (self excluded). ``update`` receives the
    codes, labels and dataset sample indices of a batch; ``compute`` gathers them (across
    processes under DDP), drops duplicated indices (``DistributedSampler`` padding) and sorts by
    index, so single- and multi-process runs give identical numbers.

    Args:
        distance: ``distance(a [A, ...], b [B, ...]) -> [A, B]``, smaller is closer. Codes keep
            their dtype (float embeddings, uint8 PQ codes, packed binary codes...); the callable
            must handle it.
        recall_ks: the ``k`` of the reported ``recall@k``.
        chunk_size: queries per distance block in ``compute`` (memory ~ ``chunk_size x N``).
        nmi: also report ``nmi`` (only for floating-point codes).
        index_factory: ``index_factory(codes, use_gpu=...) -> RetrievalIndex`` ranking like
            ``distance`` (a ranker's ``build_index``): galleries of more than ``faiss_threshold``
            items (default :data:`retrieval.index.FAISS_MIN_GALLERY`) are ranked through it
            (faiss) instead of the torch distance matrix; see :func:`retrieval.metrics.evaluate_retrieval`.
        kwargs: passed to :class:`torchmetrics.Metric`.

    ``compute`` returns ``{"recall@k": ..., "map": ..., "map@r": ..., "nmi": ...}`` as python
    floats; every process computes the same values, so no further reduction is needed.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    codes: list[Tensor]
    labels: list[Tensor]
    indices: list[Tensor]

    def __init__(
        self,
        distance: Callable[[Tensor, Tensor], Tensor],
        recall_ks: Sequence[int] = (1, 2, 4, 8),
        chunk_size: int = 1024,
        nmi: bool = True,
        index_factory: Callable[..., Any] | None = None,
        faiss_threshold: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.distance = distance
        self.index_factory = index_factory
        self.faiss_threshold = faiss_threshold
        self.recall_ks = tuple(int(k) for k in recall_ks)
        self.chunk_size = int(chunk_size)
        self.nmi = bool(nmi)
        self.add_state("codes", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")

    def update(self, codes: Tensor, labels: Tensor, indices: Tensor) -> None:  # type: ignore[override]
        """Store a batch: ``codes [B, ...]``, ``labels [B]``, dataset sample ``indices [B]``."""
        batch = codes.shape[0]
        if labels.shape != (batch,) or indices.shape != (batch,):
            raise ValueError(
                f"expected labels and indices of shape ({batch},), got {tuple(labels.shape)} "
                f"and {tuple(indices.shape)}"
            )
        if codes.dtype in (torch.float16, torch.bfloat16):
            # Under mixed precision (``--trainer.precision bf16-mixed``) embed / encode return half
            # floats: the gallery is stored and ranked in float32, like eval.py's autocast wrapper.
            codes = codes.float()
        self.codes.append(codes.detach())
        self.labels.append(labels.detach())
        self.indices.append(indices.detach().long())

    def compute(self) -> dict[str, float]:
        """Metrics over the de-duplicated, index-sorted gallery (query set = gallery)."""
        codes = dim_zero_cat(self.codes)
        labels = dim_zero_cat(self.labels)
        indices = dim_zero_cat(self.indices)
        _, codes, labels = deduplicate_by_index(indices, codes, labels)
        return evaluate_retrieval(
            codes,
            labels,
            codes,
            labels,
            self.distance,
            exclude_self=True,
            recall_ks=self.recall_ks,
            chunk_size=self.chunk_size,
            nmi=self.nmi,
            index_factory=self.index_factory,
            faiss_threshold=self.faiss_threshold,
        )
