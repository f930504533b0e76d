"""k-means product quantization on top of a trained ranker: PQ-AG's "most common configuration".

Feng et al., "Adversarial Attack on Deep Product Quantization Network for Image Retrieval",
AAAI 2020, Sec. "Implementations": a network is trained first; the features of the database
images are extracted, split into M sub-vectors, and k-means is run in each sub-space to give
the codebooks ``{c_mk}``. This wraps any trained :class:`Ranker` (e.g. a metric-learning
checkpoint) that way, so the PQ-AG attacks apply to every metric-ranker checkpoint.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import faiss
import numpy as np
import torch
from torch import Tensor

from robust_ranking.lightning_modules.ranker import Ranker
from robust_ranking.lightning_modules.soft_product_quantizer import SoftProductQuantizer, split_bits, split_dim
from robust_ranking.retrieval.pq_index import PQIndex


class KMeansPQRanker(Ranker):
    """A trained ranker's features plus k-means PQ codebooks fitted on the database.

    - :meth:`embed` / :meth:`distance` are the wrapped ranker's (unchanged: CA / QA on this
      model attack the same features as on the wrapped one).
    - :meth:`encode` -- hard codes ``[B, M]`` int64, the nearest centroid in L2 (Eq. 1, what
      faiss's k-means PQ assigns).
    - :meth:`code_distance` = :meth:`sdc_distance`; :meth:`adc_distance` for unquantized
      queries; :attr:`codebooks` -- the k-means centroids ``[M, K, d]`` (``None`` until fitted,
      so PQ attacks report "not applicable" rather than attack random codebooks).
    - :meth:`soft_assignment` -- ``softmax_k(-alpha ||z_m - c_mk||^2)`` for the PQ-AG attacks (see
      :mod:`lightning_modules.soft_product_quantizer` for why not the inner product of Eq. 7).

    Build a fitted model with :meth:`fit`. The constructor builds an unfitted one, which is how a
    saved k-means PQ checkpoint is rebuilt from its config before its state dict (the centroids
    and the ``fitted`` flag) is loaded (``python -m robust_ranking.cli.kmeans_pq``).

    Args:
        ranker: the trained ranker whose ``embed`` is quantized.
        num_bits: code length; ``num_bits / num_codebooks`` bits per sub-code.
        num_codebooks: ``M``; must divide ``num_bits`` and the embedding dimension.
        alpha: soft-assignment temperature (inverse) on negative squared distances.
        feature_dim: the embedding dimension ``D``; ``None`` reads ``ranker.backbone.embedding_dim``.
    """

    def __init__(
        self,
        ranker: Ranker,
        num_bits: int = 24,
        num_codebooks: int = 4,
        alpha: float = 50.0,
        feature_dim: int | None = None,
    ) -> None:
        super().__init__(recall_ks=getattr(ranker, "recall_ks", (1, 2, 4, 8)))
        self.save_config_hyperparameters(["ranker"])
        num_codewords = split_bits(num_bits, num_codebooks)
        sub_dim = split_dim(
            feature_dim if feature_dim is not None else getattr(getattr(ranker, "backbone", None), "embedding_dim",
                                                                None),
            num_codebooks, "embedding dimension",
            "KMeansPQRanker needs the embedding dimension: pass feature_dim or a ranker whose backbone has an "
            "integer embedding_dim",
        )
        self.ranker = ranker
        self.quantizer = SoftProductQuantizer(num_codebooks, num_codewords, sub_dim, alpha, "euclidean")
        self.quantizer.requires_grad_(False)  # fitted by k-means, never trained
        self.register_buffer("fitted", torch.tensor(False))

    @classmethod
    def fit(
        cls,
        ranker: Ranker,
        database_embeddings: Tensor,
        num_bits: int = 24,
        num_codebooks: int = 4,
        alpha: float = 50.0,
        seed: int = 0,
        niter: int = 25,
    ) -> KMeansPQRanker:
        """Wrap ``ranker`` and fit its codebooks on ``database_embeddings`` (:meth:`fit_codebooks`)."""
        if database_embeddings.dim() != 2:
            raise ValueError(f"database_embeddings must be [N, D], got shape {tuple(database_embeddings.shape)}")
        model = cls(ranker, num_bits, num_codebooks, alpha, feature_dim=int(database_embeddings.shape[1]))
        return model.to(database_embeddings.device).fit_codebooks(database_embeddings, seed=seed, niter=niter)

    @torch.no_grad()
    def fit_codebooks(self, database_embeddings: Tensor, seed: int = 0, niter: int = 25) -> KMeansPQRanker:
        """Fit the ``M`` k-means codebooks of ``K`` centroids on the database embeddings
        (``ranker.embed`` of the database images, ``[N, D]``) with faiss's ``ProductQuantizer``
        (seeded k-means per sub-space); returns ``self``."""
        quantizer = self.quantizer
        if database_embeddings.dim() != 2 or database_embeddings.shape[1] != quantizer.dim:
            raise ValueError(f"database_embeddings must be [N, D={quantizer.dim}], got shape "
                             f"{tuple(database_embeddings.shape)}")
        if database_embeddings.shape[0] < quantizer.num_codewords:
            raise ValueError(f"k-means with K={quantizer.num_codewords} centroids needs at least "
                             f"{quantizer.num_codewords} database embeddings, got {database_embeddings.shape[0]}")
        x = np.ascontiguousarray(database_embeddings.detach().cpu().to(torch.float32).numpy())
        pq = faiss.ProductQuantizer(quantizer.dim, quantizer.num_codebooks, int(math.log2(quantizer.num_codewords)))
        pq.cp.seed = seed
        pq.cp.niter = niter
        pq.cp.min_points_per_centroid = 1  # small databases are fine; no faiss warning
        pq.train(x)
        shape = (quantizer.num_codebooks, quantizer.num_codewords, quantizer.sub_dim)
        quantizer.load_codebooks(torch.from_numpy(faiss.vector_to_array(pq.centroids).reshape(shape).copy()))
        self.fitted.fill_(True)
        return self

    def _require_fitted(self) -> None:
        if not bool(self.fitted):
            raise RuntimeError("the k-means codebooks are not fitted: build the model with KMeansPQRanker.fit(...) "
                               "or load a fitted checkpoint")

    # --------------------------------------------------------------- PQ properties
    @property
    def codebooks(self) -> Tensor | None:  # type: ignore[override]
        """The k-means centroids ``[M, K, d]`` (``None`` before fitting)."""
        return self.quantizer.codebooks.detach() if bool(self.fitted) else None

    @property
    def alpha(self) -> float:
        return self.quantizer.alpha

    @property
    def num_bits(self) -> int:
        return int(round(self.quantizer.num_bits))

    # ----------------------------------------------------------------- contract
    def embed(self, x: Tensor) -> Tensor:
        return self.ranker.embed(x)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        return self.ranker.distance(a, b)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        self._require_fitted()
        return self.quantizer.hard_codes(self.embed(x))

    def code_distance(self, a: Tensor, b: Tensor) -> Tensor:
        return self.sdc_distance(a, b)

    def build_index(self, codes: Tensor, mode: Literal["sdc", "adc"] = "sdc",
                    backend: Literal["auto", "faiss", "torch"] = "auto", use_gpu: bool | None = None) -> PQIndex:
        """A :class:`retrieval.PQIndex` over ``codes``; SDC (queries are codes) by default.
        ``use_gpu`` is accepted for the common signature: faiss has no GPU flat-PQ index, so
        CUDA codebooks are searched by the exact torch look-up tables on the GPU."""
        self._require_fitted()
        index = PQIndex(self.quantizer.codebooks.detach(), mode=mode, backend=backend)
        index.add(codes)
        return index

    # ----------------------------------------------------------------- PQ API
    def soft_assignment(self, z: Tensor, alpha: float | None = None) -> Tensor:
        """``[..., M, K]`` soft codeword distribution of embeddings ``z``."""
        self._require_fitted()
        return self.quantizer.soft_assignment(z, alpha)

    def log_soft_assignment(self, z: Tensor, alpha: float | None = None) -> Tensor:
        """``log`` of :meth:`soft_assignment`, computed by a log-softmax: ``[..., M, K]``."""
        self._require_fitted()
        return self.quantizer.log_soft_assignment(z, alpha)

    def soft_quantize(self, z: Tensor, alpha: float | None = None) -> Tensor:
        return self.quantizer.soft_quantize(z, alpha)

    def sdc_distance(self, query_codes: Tensor, database_codes: Tensor) -> Tensor:
        self._require_fitted()
        return self.quantizer.sdc_distance(query_codes, database_codes)

    def adc_distance(self, query_features: Tensor, database_codes: Tensor) -> Tensor:
        self._require_fitted()
        return self.quantizer.adc_distance(query_features, database_codes)

    # ----------------------------------------------------------------- training
    def forward(self, x: Tensor) -> Tensor:
        return self.embed(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        raise RuntimeError("KMeansPQRanker is not trained: train the wrapped ranker, then build this model "
                           "with KMeansPQRanker.fit(ranker, database_embeddings, num_bits=...)")
