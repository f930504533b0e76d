"""PQ search index over stored product-quantization codes, SDC or ADC, faiss or torch.

:class:`PQIndex` implements the :class:`retrieval.index.RetrievalIndex` protocol for PQ codes:

- ``add(codes [N, M])`` stores hard codes exactly as the model produced them. faiss would
  re-encode float vectors by L2, so the codes go in with ``IndexPQ.add_sa_codes`` (bit-packed
  the way faiss packs them) and no model code is ever recomputed by faiss.
- ``search(queries, k)``: ``mode="sdc"`` takes query **codes** ``[Q, M]`` (the query is
  quantized too); ``mode="adc"`` takes query **vectors** ``[Q, D]`` in the codebooks' space.

Backends: ``faiss`` (CPU ``IndexPQ``, L2) where its limits allow -- ``K`` a power of two
(``nbits = log2 K <= 16``), and for SDC ``nbits == 8`` (faiss's SDC table is 8-bit only);
``torch`` (exact look-up tables of :mod:`retrieval.pq_search`, any device) otherwise.
``backend="auto"`` picks faiss for CPU codebooks it supports, torch otherwise (GPU tensors
stay on the GPU: faiss has no GPU flat-PQ index). For SDC, faiss encodes float queries
itself: the query codes are decoded to their codewords, which faiss encodes back to the same
codes (a codeword's nearest codeword is itself).

Results: ``(distances [Q, k], ids [Q, k])``, Euclidean distances (square root of faiss's
squared L2), closest first, ties broken by database id in both backends (faiss's answer is
widened until the k-th distance's whole tie group is in it, then sorted by ``(distance, id)``:
:func:`retrieval.index.faiss_stable_search`; PQ codes collide, so ties are the rule), padded with
``+inf`` / ``-1`` when ``k > ntotal``.
"""

from __future__ import annotations

import math
from typing import Literal

import faiss
import numpy as np
import torch
from torch import Tensor

from robust_ranking.retrieval.index import _pad, faiss_stable_search, stable_topk
from robust_ranking.retrieval.pq_search import adc_distance, decode_codes, sdc_distance, sdc_table

__all__ = ["PQIndex", "faiss_pq_supported", "pack_pq_codes"]


def _nbits(num_codewords: int) -> int | None:
    """``log2 K`` when ``K`` is a power of two, else ``None``."""
    nbits = int(round(math.log2(num_codewords))) if num_codewords > 0 else 0
    return nbits if nbits >= 1 and 2**nbits == num_codewords else None


def faiss_pq_supported(num_codewords: int, mode: Literal["sdc", "adc"]) -> bool:
    """Whether faiss ``IndexPQ`` can serve ``mode`` for ``K`` codewords per sub-codebook."""
    nbits = _nbits(num_codewords)
    if nbits is None or nbits > 16:
        return False
    return nbits == 8 if mode == "sdc" else True


def pack_pq_codes(codes: Tensor, nbits: int) -> np.ndarray:
    """faiss's PQ code layout: sub-code ``m`` in bits ``[m * nbits, (m + 1) * nbits)``, least
    significant bit first, bytes little-endian -> ``uint8 [N, ceil(M * nbits / 8)]``."""
    c = codes.detach().cpu().numpy().astype(np.int64)
    if nbits == 8:
        return np.ascontiguousarray(c.astype(np.uint8))
    bits = ((c[:, :, None] >> np.arange(nbits)) & 1).astype(np.uint8).reshape(c.shape[0], -1)
    return np.ascontiguousarray(np.packbits(bits, axis=1, bitorder="little"))


class PQIndex:
    """Exhaustive PQ search (SDC or ADC) over stored codes.

    Args:
        codebooks: ``[M, K, d]`` codewords (for cosine-trained models, the normalized ones the
            model quantizes with).
        mode: ``"sdc"`` (queries are codes) or ``"adc"`` (queries are vectors).
        backend: ``"auto"``, ``"faiss"`` (raises ``ValueError`` where faiss cannot serve the
            mode, see the module docstring) or ``"torch"``.
        chunk_size: queries per look-up block of the torch backend.
    """

    def __init__(
        self,
        codebooks: Tensor,
        mode: Literal["sdc", "adc"] = "sdc",
        backend: Literal["auto", "faiss", "torch"] = "auto",
        chunk_size: int = 1024,
    ) -> None:
        if codebooks.dim() != 3:
            raise ValueError(f"codebooks must be [M, K, d], got shape {tuple(codebooks.shape)}")
        if mode not in ("sdc", "adc"):
            raise ValueError(f"mode must be 'sdc' or 'adc', got {mode!r}")
        if backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.codebooks = codebooks.detach()
        self.num_codebooks, self.num_codewords, self.sub_dim = (int(s) for s in codebooks.shape)
        self.mode = mode
        supported = faiss_pq_supported(self.num_codewords, mode)
        if backend == "faiss" and not supported:
            need = "K = 256 (8-bit sub-codes)" if mode == "sdc" else "K a power of two up to 2^16"
            raise ValueError(f"faiss IndexPQ cannot serve {mode.upper()} with K={self.num_codewords}: needs {need}")
        if backend == "auto":
            backend = "faiss" if supported and codebooks.device.type == "cpu" else "torch"
        self.backend = backend
        self.chunk_size = int(chunk_size)
        self._codes: list[Tensor] = []
        self._index: faiss.IndexPQ | None = self._build_faiss() if backend == "faiss" else None
        self._table: Tensor | None = None  # SDC codeword-to-codeword table, built on first use

    def _build_faiss(self) -> faiss.IndexPQ:
        nbits = _nbits(self.num_codewords)
        assert nbits is not None
        index = faiss.IndexPQ(self.num_codebooks * self.sub_dim, self.num_codebooks, nbits, faiss.METRIC_L2)
        centroids = np.ascontiguousarray(self.codebooks.cpu().to(torch.float32).numpy().reshape(-1))
        faiss.copy_array_to_vector(centroids, index.pq.centroids)
        index.is_trained = True
        if self.mode == "sdc":
            index.search_type = faiss.IndexPQ.ST_SDC
            index.pq.compute_sdc_table()
        return index

    # ------------------------------------------------------------------ protocol
    @property
    def ntotal(self) -> int:
        return sum(c.shape[0] for c in self._codes)

    def add(self, codes: Tensor) -> None:
        if codes.dim() != 2 or codes.shape[1] != self.num_codebooks:
            raise ValueError(f"codes must be [N, M={self.num_codebooks}], got shape {tuple(codes.shape)}")
        if codes.is_floating_point() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integer codeword indices, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codewords):
            raise ValueError(f"codes must be in [0, {self.num_codewords})")
        codes = codes.detach().long()
        self._codes.append(codes)
        if self._index is not None:
            nbits = _nbits(self.num_codewords)
            assert nbits is not None
            self._index.add_sa_codes(pack_pq_codes(codes, nbits))

    def reset(self) -> None:
        self._codes = []
        if self._index is not None:
            self._index.reset()

    @property
    def codes(self) -> Tensor | None:
        """All stored codes ``[ntotal, M]`` (``None`` when empty)."""
        if not self._codes:
            return None
        if len(self._codes) > 1:
            self._codes = [torch.cat(self._codes)]
        return self._codes[0]

    def distances(self, queries: Tensor) -> Tensor:
        """All ``[Q, ntotal]`` distances by the exact torch look-up tables (either backend), on
        the codebooks' device."""
        self._check_queries(queries)
        db = self.codes
        if db is None:
            return torch.empty(queries.shape[0], 0, device=self.codebooks.device)
        if self.mode == "sdc":
            if self._table is None:
                self._table = sdc_table(self.codebooks)
            return sdc_distance(self.codebooks, queries, db, table=self._table)
        return adc_distance(self.codebooks, queries.to(self.codebooks), db)

    @torch.no_grad()
    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self._check_queries(queries)
        out = queries.device
        if self.ntotal == 0 or queries.shape[0] == 0:
            empty = torch.empty(queries.shape[0], 0, device=out)
            return _pad(empty, empty.long(), k)
        if self._index is not None:
            dist, ids = self._search_faiss(queries, min(k, self.ntotal))
        else:
            parts = [stable_topk(self.distances(queries[s : s + self.chunk_size]), k)
                     for s in range(0, queries.shape[0], self.chunk_size)]
            dist, ids = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        dist, ids = _pad(dist.to(out), ids.to(out), k)
        return dist, ids

    # ------------------------------------------------------------------ internals
    def _check_queries(self, queries: Tensor) -> None:
        if self.mode == "sdc":
            if queries.dim() != 2 or queries.shape[1] != self.num_codebooks or queries.is_floating_point():
                raise ValueError(f"SDC queries must be integer codes [Q, M={self.num_codebooks}], "
                                 f"got {queries.dtype} {tuple(queries.shape)}")
        elif queries.dim() != 2 or queries.shape[1] != self.num_codebooks * self.sub_dim:
            raise ValueError(f"ADC queries must be vectors [Q, D={self.num_codebooks * self.sub_dim}], "
                             f"got shape {tuple(queries.shape)}")

    def _search_faiss(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        assert self._index is not None
        x = decode_codes(self.codebooks.cpu(), queries.cpu()) if self.mode == "sdc" else queries
        x = np.ascontiguousarray(x.detach().cpu().to(torch.float32).numpy())
        return faiss_stable_search(self._index.search, x, k, self.ntotal, lambda raw: raw.clamp_min(0.0).sqrt())
