"""Exact Hamming search on packed binary codes with faiss ``IndexBinaryFlat``, stable on ties."""

from __future__ import annotations

import faiss
import numpy as np
import torch
from torch import Tensor

from robust_ranking.retrieval.hashing_metrics import pack_codes
from robust_ranking.retrieval.index import _GPU_FAISS_HELP, GPU_MAX_K, _pad, faiss_gpu_available

__all__ = ["HammingIndex"]


class HammingIndex:
    """The :class:`retrieval.index.RetrievalIndex` of hashing rankers.

    Codes (``{-1, 1}`` floats, ``{0, 1}`` or bool, ``[N, K]`` with ``K`` divisible by 8) are
    packed to ``K / 8`` bytes and searched exactly with faiss ``IndexBinaryFlat`` (XOR +
    popcount), or ``GpuIndexBinaryFlat`` when GPU faiss and a GPU are available.

    Ties: Hamming distances take only ``K + 1`` values, so a top-k list usually cuts through a
    group of equally distant items, and faiss returns an arbitrary subset of that group. Every
    metric of this project breaks ties by database index, so :meth:`search` repairs the boundary:
    items strictly closer than the k-th distance ``r`` are all in faiss's answer; the items at
    distance exactly ``r`` are re-read with a range search (``d < r + 1``, CPU index) and the
    smallest ids kept. The result equals ``sort by (distance, id)`` cut at ``k``.

    Args:
        use_gpu: ``None`` uses GPU faiss when available; ``True`` requires it; ``False``: CPU.
            Searches with ``k > GPU_MAX_K`` run on the CPU index (GPU faiss's k limit).
    """

    def __init__(self, use_gpu: bool | None = None) -> None:
        available = faiss_gpu_available()
        if use_gpu and not available:
            why = "has no GPU support" if not hasattr(faiss, "StandardGpuResources") else "sees no GPU"
            raise RuntimeError(_GPU_FAISS_HELP.format(why=why).replace("FaissFlatIndex", "HammingIndex"))
        self.use_gpu = available if use_gpu is None else bool(use_gpu)
        self._cpu: faiss.IndexBinaryFlat | None = None  # range search (ties) runs here
        self._gpu = None
        self._gpu_resources = None

    @property
    def ntotal(self) -> int:
        return 0 if self._cpu is None else int(self._cpu.ntotal)

    @property
    def num_bits(self) -> int | None:
        return None if self._cpu is None else int(self._cpu.d)

    @staticmethod
    def _packed(codes: Tensor) -> np.ndarray:
        if codes.dtype == torch.uint8 and codes.dim() == 2 and codes.max() > 1:
            raise ValueError("HammingIndex takes unpacked [N, K] codes ({-1, 1}, {0, 1} or bool), not packed bytes")
        return np.ascontiguousarray(pack_codes(codes.detach()).cpu().numpy())

    def add(self, codes: Tensor) -> None:
        x = self._packed(codes)
        bits = x.shape[1] * 8
        if self._cpu is None:
            self._cpu = faiss.IndexBinaryFlat(bits)
            if self.use_gpu:
                self._gpu_resources = faiss.StandardGpuResources()
                self._gpu = faiss.GpuIndexBinaryFlat(self._gpu_resources, bits)
        elif bits != self._cpu.d:
            raise ValueError(f"code length {bits} != index code length {self._cpu.d}")
        self._cpu.add(x)
        if self._gpu is not None:
            self._gpu.add(x)

    def reset(self) -> None:
        for index in (self._cpu, self._gpu):
            if index is not None:
                index.reset()

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """``(hamming distances float [Q, k], ids long [Q, k])``, sorted by (distance, id)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        num_q = queries.shape[0]
        if self._cpu is None or self._cpu.ntotal == 0 or num_q == 0:
            empty_d = torch.empty(num_q, 0, dtype=torch.float32, device=queries.device)
            empty_i = torch.empty(num_q, 0, dtype=torch.long, device=queries.device)
            return _pad(empty_d, empty_i, k)
        q = self._packed(queries)
        if q.shape[1] * 8 != self._cpu.d:
            raise ValueError(f"query code length {q.shape[1] * 8} != index code length {self._cpu.d}")
        kk = min(k, int(self._cpu.ntotal))
        # GPU faiss serves k <= GPU_MAX_K; a longer list (e.g. a whole ranking) is searched on the CPU.
        dist, ids = (self._gpu if (self._gpu is not None and kk <= GPU_MAX_K) else self._cpu).search(q, kk)
        dist, ids = self._stable_ties(q, dist.astype(np.int64), ids.astype(np.int64))
        d_t = torch.from_numpy(dist).to(torch.float32)
        i_t = torch.from_numpy(ids)
        d_t, i_t = _pad(d_t, i_t, k)
        return d_t.to(queries.device), i_t.to(queries.device)

    def _stable_ties(self, q: np.ndarray, dist: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Replace the items at each row's k-th distance by the smallest ids at that distance."""
        num_q, kk = dist.shape
        kth = dist[:, -1]
        closer = dist < kth[:, None]  # all of these are right (set-wise)
        need = kk - closer.sum(1)
        rows_parts, id_parts, d_parts = [np.nonzero(closer)[0]], [ids[closer]], [dist[closer]]
        # One range search per distinct boundary distance (at most K + 1 of them), vectorized
        # over the queries that share it.
        for r in np.unique(kth):
            rows = np.nonzero(kth == r)[0]
            lims, d_r, i_r = self._cpu.range_search(q[rows], int(r) + 1)  # items with d < r + 1
            owner = np.repeat(np.arange(rows.size), np.diff(lims.astype(np.int64)))
            at_r = d_r == r
            owner, cand = owner[at_r], i_r[at_r].astype(np.int64)
            order = np.lexsort((cand, owner))  # by query, then id
            owner, cand = owner[order], cand[order]
            rank = np.arange(owner.size) - np.searchsorted(owner, np.arange(rows.size))[owner]
            take = rank < need[rows][owner]
            rows_parts.append(rows[owner[take]])
            id_parts.append(cand[take])
            d_parts.append(np.full(int(take.sum()), r, dtype=np.int64))
        rows_all, ids_all, d_all = (np.concatenate(p) for p in (rows_parts, id_parts, d_parts))
        order = np.lexsort((ids_all, d_all, rows_all))  # every row holds exactly kk items
        return d_all[order].reshape(num_q, kk), ids_all[order].reshape(num_q, kk)
