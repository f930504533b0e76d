"""Deep product quantization network (DPQN): backbone -> feature -> soft PQ layer, end to end.

The product quantization network of Yu et al., "Product Quantization Network for Fast Image
Retrieval", ECCV 2018 (PQN), which PQ-AG (Feng et al., AAAI 2020, Table 2) attacks as the
"jointly trained" DPQN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_metric_learning.losses import BaseMetricLossFunction
from torch import Tensor, nn

from robust_ranking.lightning_modules.distances import euclidean_distance
from robust_ranking.lightning_modules.input_normalization import InputNormalization
from robust_ranking.lightning_modules.ranker import Ranker
from robust_ranking.lightning_modules.soft_product_quantizer import SoftProductQuantizer, split_bits, split_dim
from robust_ranking.retrieval.pq_index import PQIndex
from robust_ranking.retrieval.retrieval_metrics import RetrievalMetrics


class DPQNRanker(Ranker):
    """PQN-style deep product quantization ranker.

    Pipeline: ``x -> backbone -> z in R^D -> M sub-vectors (intra-normalized) -> soft PQ layer``
    with ``M`` learned codebooks of ``K = 2^(num_bits / M)`` codewords (normalized, cosine
    similarity, temperature ``alpha``; :class:`SoftProductQuantizer`).

    The ranker contract:

    - :meth:`embed` -- the differentiable feature ``z`` (intra-normalized: every sub-vector has
      unit norm). It is what ADC ranks queries by and what PQ-AG's Basic attack (Eq. 3) pushes;
      the soft-PQ feature is :meth:`soft_quantize` of it. (DESIGN lists "soft-PQ feature" for
      ``embed``; we expose the pre-quantization feature because both the ADC query side and
      Eq. 3 are defined on it, and the soft layer stays available to the attacks through
      :meth:`soft_assignment`.)
    - :meth:`distance` -- Euclidean distance between features (on intra-normalized features the
      ADC ranking's continuous counterpart).
    - :meth:`encode` -- hard codes ``[B, M]`` int64, ``b_m = argmax_k cos(z_m, c_mk)``.
    - :meth:`code_distance` = :meth:`sdc_distance`; :meth:`adc_distance` for unquantized queries.
    - :attr:`codebooks` -- the normalized ``[M, K, d]`` codewords (capability ``codebooks``).

    Training (``loss``): PQN's asymmetric triplet loss -- the anchors are the unquantized
    features ``z``, the positives and negatives the soft-quantized features ``s`` of the other
    batch images: pass a pytorch-metric-learning loss, e.g. ``TripletMarginLoss(margin=0.8,
    distance=DotProductSimilarity())``; it is called as ``loss(z, y, ref_emb=s, ref_labels=y)``
    (every valid triplet of the batch, an image is never its own positive). With a dot-product
    similarity ``<z, s> = sum_m <z_m, s_m>`` lies in ``[-M, M]``; on hard codes it is exactly
    the ADC similarity (``||z - q(x)||^2 = 2M - 2 <z, q(x)>``), so the loss trains the ranking
    ADC uses.

    Args:
        backbone: images (after ``input_normalization``) -> ``[B, D]`` features.
        loss: a pytorch-metric-learning loss over (anchor features, soft-quantized references).
        num_bits: code length; ``num_bits / num_codebooks`` bits per sub-code.
        num_codebooks: ``M``; must divide ``num_bits`` and the feature dimension.
        alpha: soft-assignment temperature (inverse): ``p_mk = softmax(alpha * cos)``.
        feature_dim: ``D``; ``None`` reads ``backbone.embedding_dim``.
        optimizer: optimizer factory, called with the parameters.
        lr_scheduler: optional LR scheduler factory (stepped per epoch).
        input_normalization: optional per-channel standardization inside the model.
        recall_ks: the k of the logged Recall@k.

    Validation / test log the SDC metrics as ``<stage>/recall@k``, ``<stage>/map``,
    ``<stage>/map@r`` (the base class's, through :meth:`code_distance`), the ADC metrics as
    ``<stage>/adc_recall@k``, ``<stage>/adc_map``, ``<stage>/adc_map@r``, and ``<stage>/nmi``
    (k-means NMI of the features), on the evaluation split used as its own gallery.
    """

    def __init__(
        self,
        backbone: nn.Module,
        loss: BaseMetricLossFunction,
        num_bits: int = 24,
        num_codebooks: int = 4,
        alpha: float = 10.0,
        feature_dim: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        input_normalization: InputNormalization | None = None,
        recall_ks: Sequence[int] = (1, 2, 4, 8),
    ) -> None:
        super().__init__(recall_ks=tuple(recall_ks))
        self.save_config_hyperparameters(["backbone", "loss", "input_normalization"])
        num_codewords = split_bits(num_bits, num_codebooks)
        sub_dim = split_dim(
            feature_dim if feature_dim is not None else getattr(backbone, "embedding_dim", None), num_codebooks,
            "feature dimension",
            "DPQNRanker needs the feature dimension: pass feature_dim or a backbone with an integer embedding_dim",
        )
        self.backbone = backbone
        self.loss = loss
        self.quantizer = SoftProductQuantizer(num_codebooks, num_codewords, sub_dim, alpha, "cosine")
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.input_normalization = input_normalization if input_normalization is not None else nn.Identity()
        self.val_adc_metrics = RetrievalMetrics(distance=self._adc_between_features, recall_ks=self.recall_ks,
                                                index_factory=self._adc_index_of_features)
        self.test_adc_metrics = RetrievalMetrics(distance=self._adc_between_features, recall_ks=self.recall_ks,
                                                 index_factory=self._adc_index_of_features)

    # --------------------------------------------------------------- PQ properties
    @property
    def codebooks(self) -> Tensor:  # type: ignore[override]
        """The normalized ``[M, K, d]`` codewords (detached)."""
        return self.quantizer.codebooks.detach()

    @property
    def alpha(self) -> float:
        """The soft-assignment temperature."""
        return self.quantizer.alpha

    @property
    def num_bits(self) -> int:
        return int(round(self.quantizer.num_bits))

    # ----------------------------------------------------------------- contract
    def embed(self, x: Tensor) -> Tensor:
        return self.quantizer.intra_normalize(self.backbone(self.input_normalization(x)))

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        return euclidean_distance(a, b)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return self.quantizer.hard_codes(self.embed(x))

    def code_distance(self, a: Tensor, b: Tensor) -> Tensor:
        return self.sdc_distance(a, b)

    def build_index(self, codes: Tensor, mode: Literal["sdc", "adc"] = "sdc",
                    backend: Literal["auto", "faiss", "torch"] = "auto", use_gpu: bool | None = None) -> PQIndex:
        """A :class:`retrieval.PQIndex` over ``codes``; SDC (queries are codes) by default.
        ``use_gpu`` is accepted for the common signature: faiss has no GPU flat-PQ index, so
        CUDA codebooks are searched by the exact torch look-up tables on the GPU."""
        index = PQIndex(self.codebooks, mode=mode, backend=backend)
        index.add(codes)
        return index

    # ----------------------------------------------------------------- PQ API
    def soft_assignment(self, z: Tensor, alpha: float | None = None) -> Tensor:
        """Soft codeword distribution ``[..., M, K]`` of features ``z`` (PQ-AG Eq. 7)."""
        return self.quantizer.soft_assignment(z, alpha)

    def log_soft_assignment(self, z: Tensor, alpha: float | None = None) -> Tensor:
        """``log`` of :meth:`soft_assignment`, computed by a log-softmax: ``[..., M, K]``."""
        return self.quantizer.log_soft_assignment(z, alpha)

    def soft_quantize(self, z: Tensor, alpha: float | None = None) -> Tensor:
        """The soft-PQ feature ``s`` of features ``z``."""
        return self.quantizer.soft_quantize(z, alpha)

    def sdc_distance(self, query_codes: Tensor, database_codes: Tensor) -> Tensor:
        """SDC between codes: ``[..., A, M] x [N, M] -> [..., A, N]``."""
        return self.quantizer.sdc_distance(query_codes, database_codes)

    def adc_distance(self, query_features: Tensor, database_codes: Tensor) -> Tensor:
        """ADC between unquantized query features and codes: ``[..., A, D] x [N, M] -> [..., A, N]``."""
        return self.quantizer.adc_distance(query_features, database_codes)

    def _adc_between_features(self, a: Tensor, b: Tensor) -> Tensor:
        """ADC with the gallery given as features (quantized here): for the validation metrics."""
        return self.adc_distance(a, self.quantizer.hard_codes(b))

    def _adc_index_of_features(self, features: Tensor, use_gpu: bool | None = None) -> PQIndex:
        """ADC index over the hard codes of gallery ``features``: the large-gallery path of the
        ADC validation metrics (ranks like :meth:`_adc_between_features`)."""
        return self.build_index(self.quantizer.hard_codes(features), mode="adc", use_gpu=use_gpu)

    # ----------------------------------------------------------------- training
    def forward(self, x: Tensor) -> Tensor:
        return self.embed(x)

    def compute_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """PQN's asymmetric loss: anchors ``z``, positives / negatives ``soft_quantize(z)``.

        ``ref_labels`` is the very ``labels`` tensor, so pytorch-metric-learning knows the two
        sets are the same images and drops the (image, its own soft feature) pairs."""
        return self.loss(embeddings, labels, ref_emb=self.quantizer.soft_quantize(embeddings), ref_labels=labels)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, _ = batch
        loss = self.compute_loss(self.embed(x), y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

    # ------------------------------------------------------- clean evaluation
    def _eval_pq_step(self, sdc: RetrievalMetrics, adc: RetrievalMetrics, batch: Any) -> None:
        x, y, idx = batch
        z = self.embed(x)
        sdc.update(self.quantizer.hard_codes(z), y, idx)
        adc.update(z, y, idx)

    def _eval_pq_epoch_end(self, sdc: RetrievalMetrics, adc: RetrievalMetrics, stage: str) -> None:
        self._eval_epoch_end(sdc, stage)  # SDC: recall@k, map, map@r (integer codes: no NMI)
        if adc.update_count == 0:
            return
        values = adc.compute()
        logged = {f"{stage}/{'nmi' if k == 'nmi' else 'adc_' + k}": v for k, v in values.items()}
        self.log_dict(logged, sync_dist=False)  # identical on every rank (gathered gallery)
        adc.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_pq_step(self.val_metrics, self.val_adc_metrics, batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_pq_epoch_end(self.val_metrics, self.val_adc_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_pq_step(self.test_metrics, self.test_adc_metrics, batch)

    def on_test_epoch_end(self) -> None:
        self._eval_pq_epoch_end(self.test_metrics, self.test_adc_metrics, "test")
