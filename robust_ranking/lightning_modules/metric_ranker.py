"""Metric-learning ranker: backbone -> embedding, trained with a pytorch-metric-learning loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity, LpDistance
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.miners import BaseMiner
from torch import Tensor, nn

from robust_ranking.lightning_modules.distances import cosine_distance, euclidean_distance
from robust_ranking.lightning_modules.input_normalization import InputNormalization
from robust_ranking.lightning_modules.ranker import Ranker
from robust_ranking.retrieval.index import FaissFlatIndex, RetrievalIndex


def _normalized_euclidean_distance(a: Tensor, b: Tensor) -> Tensor:
    return euclidean_distance(F.normalize(a, dim=-1), F.normalize(b, dim=-1))


def ranking_distance(distance: BaseDistance) -> tuple[Callable[[Tensor, Tensor], Tensor], str | None]:
    """The broadcasting distance function matching a pml distance object, and the faiss metric
    that ranks raw codes the same way (``"ip"`` assumes L2-normalized codes; ``None``: none).

    Similarities are turned into distances (``1 - s``) so that smaller is closer everywhere.
    """
    if isinstance(distance, CosineSimilarity):
        return cosine_distance, "ip"
    if isinstance(distance, LpDistance) and distance.p == 2 and distance.power == 1:
        if distance.normalize_embeddings:  # pml normalizes before measuring: do the same
            return _normalized_euclidean_distance, None
        return euclidean_distance, "l2"
    raise ValueError(
        f"MetricRanker supports the CosineSimilarity and LpDistance(p=2, power=1) distances of "
        f"pytorch-metric-learning, got {type(distance).__name__}"
    )


class MetricRanker(Ranker):
    """A deep metric-learning ranker (ECCV 2020's CT / ET / CC models and their defended twins).

    The parts are injected: the backbone, the pytorch-metric-learning loss (which carries the
    distance, e.g. ``TripletMarginLoss(margin=0.2, distance=CosineSimilarity())``), an optional
    miner, the optimizer and the LR scheduler. The ranker's :meth:`distance` is the loss's
    distance (similarities become ``1 - s``), so training, retrieval and attacks agree.

    Args:
        backbone: images in ``[0, 1]`` (after ``input_normalization``) -> features ``[B, D]``.
        loss: a pytorch-metric-learning loss; its ``distance`` must be ``CosineSimilarity`` or
            ``LpDistance(p=2)``.
        miner: optional pytorch-metric-learning miner; ``None`` uses every valid tuple in the
            batch (the loss's own default).
        optimizer: optimizer factory, called with the parameters.
        lr_scheduler: optional scheduler factory, called with the optimizer (stepped per epoch).
        normalize_embeddings: L2-normalize the embedding (the ECCV models do, for both
            distances).
        input_normalization: optional per-channel ``(mean, std)`` applied inside the model, so
            attack budgets stay in pixel units.
        recall_ks: the k of the logged Recall@k.
    """

    def __init__(
        self,
        backbone: nn.Module,
        loss: BaseMetricLossFunction,
        miner: BaseMiner | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        normalize_embeddings: bool = True,
        input_normalization: InputNormalization | None = None,
        recall_ks: Sequence[int] = (1, 2, 4, 8),
    ) -> None:
        super().__init__(recall_ks=tuple(recall_ks))
        self.save_config_hyperparameters(["backbone", "loss", "miner", "input_normalization"])
        self.backbone = backbone
        self.loss = loss
        self.miner = miner
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.normalize_embeddings = normalize_embeddings
        self.input_normalization = input_normalization if input_normalization is not None else nn.Identity()
        self._distance, faiss_metric = ranking_distance(loss.distance)
        # faiss ranks raw codes: inner product equals cosine only for normalized embeddings.
        self.faiss_metric = faiss_metric if (faiss_metric == "l2" or normalize_embeddings) else None

    # ----------------------------------------------------------------- contract
    def embed(self, x: Tensor) -> Tensor:
        z = self.backbone(self.input_normalization(x))
        return F.normalize(z, dim=-1) if self.normalize_embeddings else z

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        return self._distance(a, b)

    def build_index(self, codes: Tensor, use_gpu: bool | None = None) -> RetrievalIndex:
        if self.faiss_metric is None:
            return super().build_index(codes)
        index = FaissFlatIndex(metric=self.faiss_metric, use_gpu=use_gpu)
        index.add(codes)
        return index

    # ----------------------------------------------------------------- training
    def forward(self, x: Tensor) -> Tensor:
        return self.embed(x)

    def compute_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The metric-learning loss of a batch of embeddings (used by the defense callbacks too)."""
        tuples = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, tuples)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, _ = batch
        loss = self.compute_loss(self.embed(x), y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

