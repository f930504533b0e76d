"""Deep Cauchy Hashing ranker: backbone -> K-bit tanh code, Hamming retrieval (Cao et al., CVPR 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from robust_ranking.lightning_modules.dch_loss import DCHLoss
from robust_ranking.lightning_modules.input_normalization import InputNormalization
from robust_ranking.lightning_modules.ranker import Ranker
from robust_ranking.retrieval.hamming_index import HammingIndex
from robust_ranking.retrieval.hashing_metrics import hamming_distance, sign_codes
from robust_ranking.retrieval.index import RetrievalIndex

__all__ = ["DCHRanker"]


class DCHRanker(Ranker):
    """A deep hashing ranker trained with the DCH loss; the model SDHA (ICMR 2021) attacks.

    ``x -> backbone -> ReLU -> Linear(F, K) = g(x) -> tanh``: the hash layer of DCH (their
    ``fch`` on top of a ReLU feature layer). With ``g`` the penultimate layer of SDHA Sec. 3,

    - :meth:`hash_logits` ``g(x)`` (the hashing capability: every model with ``hash_bits``
      has it): attacks read the sign code and any tanh scale from one forward pass;
    - :meth:`embed` ``f(x) = tanh(scale * g(x))``, ``scale = 1`` by default; the HAG / SDHA
      "gamma trick" (Sec. 4.4) is ``scale < 1``, which keeps gradients alive through a
      saturated tanh;
    - :meth:`encode` ``h(x) = sgn(g(x))`` in ``{-1, +1}`` as float (``sgn(0) = -1``);
    - :meth:`distance` / :meth:`code_distance` ``(K - <a, b>) / 2``: the Hamming distance on
      sign codes, its inner-product relaxation on tanh codes (differentiable, broadcasting);
    - :meth:`build_index`: :class:`retrieval.HammingIndex` (faiss ``IndexBinaryFlat`` on packed
      bits, GPU faiss when available, ties broken by database index).

    Validation / test log the base metrics (test split = gallery, self excluded) ranked by
    Hamming distance with stable ties; the query / database numbers of the hashing papers are
    the ``clean_query_database`` section of an ``eval.py`` report on a query / database split
    (``evaluation.engine.clean_query_database_metrics``; ``scripts/sdha_clean_map.py`` prints
    SDHA Table 1 from the reports; see docs/dch.md).

    Args:
        backbone: images (after ``input_normalization``) -> features ``[B, F]``; ``F`` is read
            from ``backbone.embedding_dim``.
        loss: the DCH loss module (its gamma and quantization weight).
        hash_bits: code length K (a multiple of 8 for packed search: 16, 32, 48, 64 ...).
        optimizer: optimizer factory, called with the parameters.
        lr_scheduler: optional scheduler factory (stepped per epoch).
        input_normalization: optional per-channel ``(mean, std)`` inside the model, so attack
            budgets stay in pixel units.
        recall_ks: the k of the logged Recall@k.
    """

    def __init__(
        self,
        backbone: nn.Module,
        loss: DCHLoss | None = None,
        hash_bits: int = 64,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        input_normalization: InputNormalization | None = None,
        recall_ks: Sequence[int] = (1, 2, 4, 8),
    ) -> None:
        if isinstance(hash_bits, bool) or not isinstance(hash_bits, int) or hash_bits < 8 or hash_bits % 8:
            raise ValueError(f"hash_bits must be a positive multiple of 8 (16, 32, 48, 64 ...), got {hash_bits!r}")
        feature_dim = getattr(backbone, "embedding_dim", None)
        if not isinstance(feature_dim, int):
            raise ValueError(f"DCHRanker needs a backbone with an int `embedding_dim`, got {type(backbone).__name__}")
        super().__init__(recall_ks=tuple(recall_ks))
        self.save_config_hyperparameters(["backbone", "loss", "input_normalization"])
        self.backbone = backbone
        self.hash_layer = nn.Linear(feature_dim, hash_bits)
        self.loss = loss if loss is not None else DCHLoss()
        self.hash_bits = hash_bits
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.input_normalization = input_normalization if input_normalization is not None else nn.Identity()

    # ----------------------------------------------------------------- contract
    def hash_logits(self, x: Tensor) -> Tensor:
        """``g(x) [B, K]``: the pre-activation of the hash layer (SDHA's penultimate layer)."""
        return self.hash_layer(F.relu(self.backbone(self.input_normalization(x))))

    def embed(self, x: Tensor, scale: float = 1.0) -> Tensor:
        """``tanh(scale * g(x))``: the continuous relaxation of the code (``scale`` = SDHA's gamma)."""
        return torch.tanh(scale * self.hash_logits(x))

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        return hamming_distance(a, b)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return sign_codes(self.hash_logits(x))

    def code_distance(self, a: Tensor, b: Tensor) -> Tensor:
        return hamming_distance(a, b)

    def build_index(self, codes: Tensor, use_gpu: bool | None = None) -> RetrievalIndex:
        index = HammingIndex(use_gpu=use_gpu)
        index.add(codes)
        return index

    # ----------------------------------------------------------------- training
    def forward(self, x: Tensor) -> Tensor:
        return self.embed(x)

    def compute_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The DCH loss of a batch of tanh codes (used by the defense callbacks too)."""
        return self.loss(embeddings, labels)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, _ = batch
        pair, quant = self.loss.components(self.embed(x), y)
        loss = pair + self.loss.quantization_weight * quant
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        self.log_dict({"train/pair_loss": pair, "train/quantization_loss": quant}, on_step=False, on_epoch=True,
                      batch_size=len(y))
        return loss

