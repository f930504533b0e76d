"""k-means product quantization on top of a trained ranker: PQ-AG's "most common configuration".

Feng et al., "Adversarial Attack on Deep Product Quantization Network for Image Retrieval",
AAAI 2020, Sec. "Implementations": a network is trained first; the features of the database
images are extracted, split into M sub-vectors, and k-means is run in each sub-space to give
the codebooks ``{c_mk}``. This wraps any trained :class:`Ranker` (e.g. a metric-learning
checkpoint) that way, so the PQ-AG attacks apply to every metric-ranker checkpoint.
"""

from __future__ import annotations

from typing import Any, Literal

import faiss
import numpy as np
import torch
from torch import Tensor

from lightning_modules.ranker import Ranker
from lightning_modules.soft_product_quantizer import SoftProductQuantizer, split_bits
from retrieval.pq_index import PQIndex


class KMeansPQRanker(Ranker):
    """A trained ranker's features plus k-means PQ codebooks fitted on the database.

    - :meth:`embed` / :meth:`distance` are the wrapped ranker's (unchanged: CA / QA on this
      model attack the same features as on the wrapped one).
    - :meth:`encode` -- hard codes ``[B, M]`` int64, the nearest centroid in L2 (Eq. 1, what
      faiss's k-means PQ assigns).
    - :meth:`code_distance` = :meth:`sdc_distance`; :meth:`adc_distance` for unquantized
      queries; :attr:`codebooks` -- the k-means centroids ``[M, K, d]``.
    - :meth:`soft_assignment` -- ``softmax_k(-alpha ||z_m - c_mk||^2)`` for the PQ-AG attacks (see
      :mod:`lightning_modules.soft_product_quantizer` for why not the inner product of Eq. 7).

    Build it with :meth:`fit`; the constructor takes already fitted codebooks.

    Args:
        ranker: the trained ranker whose ``embed`` is quantized.
        codebooks: ``[M, K, d]`` centroids, ``M * d`` = the embedding dimension.
        alpha: soft-assignment temperature (inverse) on negative squared distances.
    """

    def __init__(self, ranker: Ranker, codebooks: Tensor, alpha: float = 50.0) -> None:
        super().__init__(recall_ks=getattr(ranker, "recall_ks", (1, 2, 4, 8)))
        if codebooks.dim() != 3:
            raise ValueError(f"codebooks must be [M, K, d], got shape {tuple(codebooks.shape)}")
        num_codebooks, num_codewords, sub_dim = (int(s) for s in codebooks.shape)
        self.ranker = ranker
        self.quantizer = SoftProductQuantizer(num_codebooks, num_codewords, sub_dim, alpha, "euclidean")
        self.quantizer.load_codebooks(codebooks)
        self.quantizer.requires_grad_(False)  # fitted by k-means, never trained

    @classmethod
    @torch.no_grad()
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
        """Fit ``M`` k-means codebooks of ``K = 2^(num_bits / M)`` centroids on the database
        embeddings (``ranker.embed`` of the database images, ``[N, D]``) with faiss's
        ``ProductQuantizer`` (seeded k-means per sub-space) and wrap ``ranker``."""
        num_codewords = split_bits(num_bits, num_codebooks)
        if database_embeddings.dim() != 2:
            raise ValueError(f"database_embeddings must be [N, D], got shape {tuple(database_embeddings.shape)}")
        n, dim = database_embeddings.shape
        if dim % num_codebooks:
            raise ValueError(f"embedding dimension {dim} does not split into num_codebooks={num_codebooks} "
                             "equal sub-vectors")
        if n < num_codewords:
            raise ValueError(f"k-means with K={num_codewords} centroids needs at least {num_codewords} database "
                             f"embeddings, got {n}")
        x = np.ascontiguousarray(database_embeddings.detach().cpu().to(torch.float32).numpy())
        pq = faiss.ProductQuantizer(dim, num_codebooks, num_bits // num_codebooks)
        pq.cp.seed = seed
        pq.cp.niter = niter
        pq.cp.min_points_per_centroid = 1  # small databases are fine; no faiss warning
        pq.train(x)
        centroids = faiss.vector_to_array(pq.centroids).reshape(num_codebooks, num_codewords, dim // num_codebooks)
        model = cls(ranker, torch.from_numpy(centroids.copy()), alpha=alpha)
        return model.to(database_embeddings.device)

    # --------------------------------------------------------------- PQ properties
    @property
    def codebooks(self) -> Tensor:  # type: ignore[override]
        """The k-means centroids ``[M, K, d]``."""
        return self.quantizer.codebooks.detach()

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
        return self.quantizer.hard_codes(self.embed(x))

    def code_distance(self, a: Tensor, b: Tensor) -> Tensor:
        return self.sdc_distance(a, b)

    def build_index(self, codes: Tensor, mode: Literal["sdc", "adc"] = "sdc",
                    backend: Literal["auto", "faiss", "torch"] = "auto") -> PQIndex:
        """A :class:`retrieval.PQIndex` over ``codes``; SDC (queries are codes) by default."""
        index = PQIndex(self.codebooks, mode=mode, backend=backend)
        index.add(codes)
        return index

    # ----------------------------------------------------------------- PQ API
    def soft_assignment(self, z: Tensor, alpha: float | None = None) -> Tensor:
        """``[..., M, K]`` soft codeword distribution of embeddings ``z``."""
        return self.quantizer.soft_assignment(z, alpha)

    def log_soft_assignment(self, z: Tensor, alpha: float | None = None) -> Tensor:
        """``log`` of :meth:`soft_assignment`, computed by a log-softmax: ``[..., M, K]``."""
        return self.quantizer.log_soft_assignment(z, alpha)

    def soft_quantize(self, z: Tensor, alpha: float | None = None) -> Tensor:
        return self.quantizer.soft_quantize(z, alpha)

    def sdc_distance(self, query_codes: Tensor, database_codes: Tensor) -> Tensor:
        return self.quantizer.sdc_distance(query_codes, database_codes)

    def adc_distance(self, query_features: Tensor, database_codes: Tensor) -> Tensor:
        return self.quantizer.adc_distance(query_features, database_codes)

    # ----------------------------------------------------------------- training
    def forward(self, x: Tensor) -> Tensor:
        return self.embed(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        raise RuntimeError("KMeansPQRanker is not trained: train the wrapped ranker, then build this model "
                           "with KMeansPQRanker.fit(ranker, database_embeddings, num_bits=...)")
