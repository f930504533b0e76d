"""The soft product-quantization layer of PQN (Yu et al., ECCV 2018) and its hard counterpart.

A feature ``z`` in ``R^D`` is split into ``M`` sub-vectors ``z_m`` of ``d = D / M`` dims. Each
sub-vector is compared with the ``K`` codewords ``c_mk`` of its codebook, and

- **soft assignment** (PQN; PQ-AG Eq. 7 with a temperature):
  ``p_mk = softmax_k(alpha * sim(z_m, c_mk))``, and the soft-quantized sub-vector is
  ``s_m = sum_k p_mk c_mk`` -- differentiable w.r.t. the feature and the codewords;
- **hard assignment** (PQ-AG Eq. 1 / Eq. 6): ``b_m = argmax_k sim(z_m, c_mk)``, stored as the
  code; the quantized feature is ``q(z) = (c_{1 b_1}, ..., c_{M b_M})``.

As ``alpha -> inf`` the soft assignment tends to the one-hot hard one and ``s -> q(z)``.

Two similarity measures (``similarity``):

- ``"cosine"`` (PQN, DPQN): sub-vectors and codewords are intra-normalized (each L2-normalized
  within its sub-space) and ``sim`` is their inner product, i.e. the cosine. The effective
  codebooks (:attr:`codebooks`) are the normalized codewords; on unit vectors
  ``argmax cos = argmin L2``, so faiss's L2 PQ and this layer agree on every code.
- ``"euclidean"`` (k-means PQ): ``sim = -||z_m - c_mk||^2``, so the peak of the soft assignment
  is exactly the Eq. 1 (k-means / faiss) code. PQ-AG Eqs. 6-7 write the inner product
  ``<z_m, c_mk>`` for k-means codebooks too; with un-normalized k-means centroids its argmax
  need not be the stored code, so we use the negative squared distance (PQN's own form).

SDC / ADC distances go through the exact look-up tables of :mod:`retrieval.pq_search`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robust_ranking.retrieval.pq_search import adc_distance, decode_codes, sdc_distance, sdc_table


def split_bits(num_bits: int, num_codebooks: int) -> int:
    """``K = 2^(num_bits / M)`` codewords per codebook; a clear ``ValueError`` if the bit budget
    does not factor into ``M`` sub-codes of a whole number of bits (at most 16 each)."""
    for value, name in ((num_bits, "num_bits"), (num_codebooks, "num_codebooks")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if num_bits % num_codebooks:
        raise ValueError(
            f"a {num_bits}-bit code does not split into num_codebooks={num_codebooks} sub-codes of a whole "
            f"number of bits each; use a bit budget divisible by {num_codebooks} or another num_codebooks"
        )
    sub_bits = num_bits // num_codebooks
    if sub_bits > 16:
        raise ValueError(f"{num_bits} bits in {num_codebooks} codebooks means K = 2^{sub_bits} codewords each; "
                         "at most 2^16 are supported: use more codebooks")
    return 2**sub_bits


def split_dim(dim: object, num_codebooks: int, what: str, unknown: str) -> int:
    """Sub-vector size ``d = D / M`` of a ``D``-dim feature; a clear ``ValueError`` with the message
    ``unknown`` if ``D`` is not a positive integer, or naming ``what`` (e.g. "feature dimension") if
    it does not split into ``num_codebooks`` equal sub-vectors."""
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(unknown)
    if dim % num_codebooks:
        raise ValueError(f"{what} {dim} does not split into num_codebooks={num_codebooks} equal sub-vectors")
    return dim // num_codebooks


class SoftProductQuantizer(nn.Module):
    """``M`` codebooks of ``K`` codewords of ``d`` dims, with soft and hard assignment.

    Args:
        num_codebooks: ``M``.
        num_codewords: ``K``.
        sub_dim: ``d``; features have ``D = M * d`` dims.
        alpha: softmax temperature (inverse), > 0. PQN's soft layer; PQ-AG Eq. 7 is alpha = 1.
        similarity: ``"cosine"`` (intra-normalized, PQN) or ``"euclidean"`` (k-means PQ).

    The codewords are an ``nn.Parameter`` (learned end to end by DPQN; k-means PQ loads fitted
    ones with :meth:`load_codebooks` and never trains them), initialized from a seeded normal
    distribution so that models are reproducible.
    """

    def __init__(
        self,
        num_codebooks: int,
        num_codewords: int,
        sub_dim: int,
        alpha: float = 10.0,
        similarity: Literal["cosine", "euclidean"] = "cosine",
    ) -> None:
        super().__init__()
        for value, name in ((num_codebooks, "num_codebooks"), (num_codewords, "num_codewords"), (sub_dim, "sub_dim")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha (the soft-assignment temperature) must be a finite number > 0, got {alpha!r}")
        if similarity not in ("cosine", "euclidean"):
            raise ValueError(f"similarity must be 'cosine' or 'euclidean', got {similarity!r}")
        self.num_codebooks = num_codebooks
        self.num_codewords = num_codewords
        self.sub_dim = sub_dim
        self.alpha = float(alpha)
        self.similarity = similarity
        generator = torch.Generator().manual_seed(0)
        self.codewords = nn.Parameter(torch.randn(num_codebooks, num_codewords, sub_dim, generator=generator))

    @property
    def dim(self) -> int:
        """``D = M * d``."""
        return self.num_codebooks * self.sub_dim

    @property
    def num_bits(self) -> float:
        """Code length ``M * log2 K``."""
        return self.num_codebooks * math.log2(self.num_codewords)

    @property
    def codebooks(self) -> Tensor:
        """The effective ``[M, K, d]`` codewords (normalized for ``"cosine"``), differentiable."""
        return F.normalize(self.codewords, dim=-1) if self.similarity == "cosine" else self.codewords

    @torch.no_grad()
    def load_codebooks(self, codebooks: Tensor) -> None:
        """Replace the codewords (e.g. by k-means centroids) with a ``[M, K, d]`` tensor."""
        if tuple(codebooks.shape) != tuple(self.codewords.shape):
            raise ValueError(f"codebooks must be {tuple(self.codewords.shape)}, got {tuple(codebooks.shape)}")
        self.codewords.copy_(codebooks.to(self.codewords))

    # ------------------------------------------------------------------ features
    def split(self, z: Tensor) -> Tensor:
        """``[..., D] -> [..., M, d]``."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"features must have D={self.dim} dims (M={self.num_codebooks} x d={self.sub_dim}), "
                             f"got shape {tuple(z.shape)}")
        return z.reshape(*z.shape[:-1], self.num_codebooks, self.sub_dim)

    def intra_normalize(self, z: Tensor) -> Tensor:
        """Each sub-vector L2-normalized (PQN's intra-normalization): ``[..., D] -> [..., D]``."""
        return F.normalize(self.split(z), dim=-1).reshape(z.shape)

    # ---------------------------------------------------------------- assignment
    def similarities(self, z: Tensor) -> Tensor:
        """``sim(z_m, c_mk)``: ``[..., D] -> [..., M, K]`` (cosine, or ``-||z_m - c_mk||^2``)."""
        parts = self.split(z).unsqueeze(-2)  # [..., M, 1, d]
        codebooks = self.codebooks
        if self.similarity == "cosine":
            return (F.normalize(parts, dim=-1) @ codebooks.transpose(1, 2)).squeeze(-2)
        cross = (parts @ codebooks.transpose(1, 2)).squeeze(-2)
        return 2.0 * cross - (parts * parts).sum(-1) - (codebooks * codebooks).sum(-1)

    def soft_assignment(self, z: Tensor, alpha: float | None = None) -> Tensor:
        """``p_mk = softmax_k(alpha * sim(z_m, c_mk))``: ``[..., M, K]`` (``alpha=None``: the layer's)."""
        return torch.softmax((self.alpha if alpha is None else alpha) * self.similarities(z), dim=-1)

    def log_soft_assignment(self, z: Tensor, alpha: float | None = None) -> Tensor:
        """``log p_mk`` by a log-softmax (finite where ``p_mk`` underflows): ``[..., M, K]``."""
        return torch.log_softmax((self.alpha if alpha is None else alpha) * self.similarities(z), dim=-1)

    def soft_quantize(self, z: Tensor, alpha: float | None = None) -> Tensor:
        """``s_m = sum_k p_mk c_mk``: ``[..., D] -> [..., D]`` (the soft-PQ feature)."""
        s = self.soft_assignment(z, alpha).unsqueeze(-2) @ self.codebooks  # [..., M, 1, d]
        return s.reshape(z.shape)

    def hard_codes(self, z: Tensor) -> Tensor:
        """``b_m = argmax_k sim(z_m, c_mk)``: ``[..., D] -> [..., M]`` int64 (no gradient)."""
        return self.similarities(z.detach()).argmax(dim=-1)

    def decode(self, codes: Tensor) -> Tensor:
        """``q(z)``: ``[..., M]`` codes -> ``[..., D]`` codewords."""
        return decode_codes(self.codebooks, codes)

    # ------------------------------------------------------------------ distances
    def sdc_distance(self, query_codes: Tensor, database_codes: Tensor) -> Tensor:
        """SDC ``[..., A, M] x [N, M] -> [..., A, N]``."""
        with torch.no_grad():
            codebooks = self.codebooks
            return sdc_distance(codebooks, query_codes, database_codes, table=sdc_table(codebooks))

    def adc_distance(self, queries: Tensor, database_codes: Tensor) -> Tensor:
        """ADC ``[..., A, D] x [N, M] -> [..., A, N]`` (differentiable w.r.t. ``queries``).

        For ``"cosine"`` the queries are intra-normalized first, as the model's features are."""
        if self.similarity == "cosine":
            queries = self.intra_normalize(queries)
        return adc_distance(self.codebooks, queries, database_codes)
