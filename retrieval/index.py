"""Exact nearest-neighbour search indexes over retrieval codes.

Two implementations of the :class:`RetrievalIndex` protocol:

- :class:`TorchFlatIndex` -- brute force with any ``distance(a, b) -> [A, B]`` callable, on
  whatever device the codes live (works for every code type: float, PQ, packed binary).
  Ties are broken by gallery index, like the metrics in :mod:`retrieval.metrics`.
- :class:`FaissFlatIndex` -- exact faiss ``IndexFlatL2`` / ``IndexFlatIP`` on float32 codes,
  on the GPU when the installed faiss supports it. Tie order is whatever faiss returns.

Both return ``(distances [Q, k] float, indices [Q, k] long)`` sorted closest first, on the
queries' device. When ``k`` exceeds the number of stored items, the missing slots are padded
with distance ``+inf`` and index ``-1`` (faiss's convention for the index).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol, runtime_checkable

import faiss
import numpy as np
import torch
from torch import Tensor

__all__ = ["FaissFlatIndex", "RetrievalIndex", "TorchFlatIndex", "faiss_gpu_available", "stable_topk"]


@runtime_checkable
class RetrievalIndex(Protocol):
    """What evaluation and attacks need from a search index."""

    @property
    def ntotal(self) -> int:
        """Number of stored items."""
        ...

    def add(self, codes: Tensor) -> None:
        """Append ``codes [N, ...]``; they get the next consecutive ids."""
        ...

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """``k`` nearest stored items per query: ``(distances [Q, k] float, ids [Q, k] long)``,
        closest first."""
        ...

    def reset(self) -> None:
        """Remove every stored item."""
        ...


def _pad(dist: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Pad ``[Q, k'] -> [Q, k]`` with ``+inf`` / ``-1`` (not enough stored items)."""
    missing = k - dist.shape[1]
    if missing <= 0:
        return dist, ids
    q = dist.shape[0]
    dist = torch.cat([dist, dist.new_full((q, missing), float("inf"))], dim=1)
    ids = torch.cat([ids, ids.new_full((q, missing), -1)], dim=1)
    return dist, ids


def stable_topk(distances: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` smallest entries of each row, ascending, ties broken by column index.

    Equivalent to ``torch.sort(distances, stable=True)[..., :k]`` but O(N) per row plus a sort
    of ``k`` items: ``torch.topk`` finds the k-th value, everything strictly smaller is kept and
    the tied entries at the k-th value are filled in column order. NaN counts as ``+inf``.
    """
    num_q, num_n = distances.shape
    k = min(k, num_n)
    if k == 0:
        return distances[:, :0], torch.zeros(num_q, 0, dtype=torch.long, device=distances.device)
    if distances.is_floating_point():
        # (not nan_to_num: it would also turn +inf into the largest finite float)
        distances = distances.masked_fill(torch.isnan(distances), float("inf"))
    kth = distances.topk(k, dim=1, largest=False, sorted=False).values.max(dim=1, keepdim=True).values
    below = distances < kth
    tied = distances == kth
    # How many tied entries each row still needs; take the first ones in column order.
    need = k - below.sum(dim=1, keepdim=True)
    chosen = below | (tied & (tied.cumsum(dim=1) <= need))
    # nonzero() is row-major, so each row's selected columns come out in increasing order.
    cols = chosen.nonzero()[:, 1].view(num_q, k)
    vals = distances.gather(1, cols)
    vals, pos = torch.sort(vals, dim=1, stable=True)  # stable: ties stay in column order
    return vals, cols.gather(1, pos)


class TorchFlatIndex:
    """Brute-force index: ``distance(queries, stored)`` in chunks of queries, exact top-k.

    Codes are kept as given (dtype and device); queries are moved to the codes' device for the
    search and results are returned on the queries' device.
    """

    def __init__(self, distance: Callable[[Tensor, Tensor], Tensor], chunk_size: int = 1024) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.distance = distance
        self.chunk_size = int(chunk_size)
        self._parts: list[Tensor] = []
        self._codes: Tensor | None = None  # concatenation of _parts, built lazily

    @property
    def ntotal(self) -> int:
        return sum(p.shape[0] for p in self._parts)

    @property
    def codes(self) -> Tensor | None:
        """All stored codes ``[ntotal, ...]`` (``None`` when empty)."""
        if self._codes is None and self._parts:
            # Concatenate once per search rather than on every add (many small adds are cheap).
            self._codes = torch.cat(self._parts) if len(self._parts) > 1 else self._parts[0]
            self._parts = [self._codes]
        return self._codes

    def add(self, codes: Tensor) -> None:
        if codes.dim() < 2:
            raise ValueError(f"codes must be [N, ...], got shape {tuple(codes.shape)}")
        if self._parts and codes.shape[1:] != self._parts[0].shape[1:]:
            stored = tuple(self._parts[0].shape[1:])
            raise ValueError(f"code shape {tuple(codes.shape[1:])} != stored {stored}")
        self._parts.append(codes.detach())
        self._codes = None

    def reset(self) -> None:
        self._parts = []
        self._codes = None

    @torch.no_grad()
    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        out_device = queries.device
        num_q = queries.shape[0]
        db = self.codes
        if db is None:
            empty_d = torch.empty(num_q, 0, dtype=torch.float32, device=out_device)
            empty_i = torch.empty(num_q, 0, dtype=torch.long, device=out_device)
            return _pad(empty_d, empty_i, k)
        q = queries.to(db.device)
        dists, ids = [], []
        for start in range(0, num_q, self.chunk_size):
            d, i = stable_topk(self.distance(q[start : start + self.chunk_size], db), k)
            dists.append(d if d.is_floating_point() else d.to(torch.float32))
            ids.append(i)
        if not dists:  # zero queries
            dists = [torch.empty(0, min(k, db.shape[0]), dtype=torch.float32, device=db.device)]
            ids = [torch.empty(0, min(k, db.shape[0]), dtype=torch.long, device=db.device)]
        dist, idx = _pad(torch.cat(dists), torch.cat(ids), k)
        return dist.to(out_device), idx.to(out_device)


def faiss_gpu_available() -> bool:
    """Whether the installed faiss was built with GPU support and sees at least one GPU."""
    if not hasattr(faiss, "StandardGpuResources"):
        return False
    try:
        return faiss.get_num_gpus() > 0
    except Exception:  # a broken CUDA runtime should mean "no GPU", not a crash
        return False


_GPU_FAISS_HELP = (
    "FaissFlatIndex(use_gpu=True) needs a faiss build with GPU support and a visible GPU, but "
    "the installed faiss {why}. Install GPU faiss, e.g. `conda install -c pytorch -c nvidia "
    "faiss-gpu` or `pip install faiss-gpu-cu12` (in place of faiss-cpu), or pass use_gpu=None/False."
)


class FaissFlatIndex:
    """Exact faiss search on float32 codes.

    Args:
        metric: ``"l2"`` -- distances are Euclidean (the square root of faiss's squared L2,
            clamped at 0); ``"ip"`` -- distances are ``1 - <q, x>`` (the cosine distance for
            L2-normalized codes).
        use_gpu: ``None`` uses GPU faiss when available, else CPU; ``True`` requires it and
            raises ``RuntimeError`` otherwise; ``False`` forces CPU.
    """

    def __init__(self, metric: Literal["l2", "ip"], use_gpu: bool | None = None) -> None:
        if metric not in ("l2", "ip"):
            raise ValueError(f"metric must be 'l2' or 'ip', got {metric!r}")
        available = faiss_gpu_available()
        if use_gpu and not available:
            why = "has no GPU support" if not hasattr(faiss, "StandardGpuResources") else "sees no GPU"
            raise RuntimeError(_GPU_FAISS_HELP.format(why=why))
        self.metric = metric
        self.use_gpu = available if use_gpu is None else bool(use_gpu)
        self._index: faiss.Index | None = None
        self._gpu_resources = None  # must outlive the GPU index

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    @staticmethod
    def _to_numpy(x: Tensor) -> np.ndarray:
        if x.dim() != 2:
            raise ValueError(f"faiss codes must be [N, D], got shape {tuple(x.shape)}")
        return np.ascontiguousarray(x.detach().to(torch.float32).cpu().numpy())

    def _build(self, dim: int) -> faiss.Index:
        index = faiss.IndexFlatL2(dim) if self.metric == "l2" else faiss.IndexFlatIP(dim)
        if self.use_gpu:
            self._gpu_resources = faiss.StandardGpuResources()
            device = torch.cuda.current_device() if torch.cuda.is_available() else 0
            index = faiss.index_cpu_to_gpu(self._gpu_resources, device, index)
        return index

    def add(self, codes: Tensor) -> None:
        x = self._to_numpy(codes)
        if self._index is None:
            self._index = self._build(x.shape[1])
        elif x.shape[1] != self._index.d:
            raise ValueError(f"code dimension {x.shape[1]} != index dimension {self._index.d}")
        self._index.add(x)

    def reset(self) -> None:
        if self._index is not None:
            self._index.reset()

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self._index is None:
            num_q = queries.shape[0]
            empty_d = torch.empty(num_q, 0, dtype=torch.float32, device=queries.device)
            empty_i = torch.empty(num_q, 0, dtype=torch.long, device=queries.device)
            return _pad(empty_d, empty_i, k)
        raw_d, raw_i = self._index.search(self._to_numpy(queries), k)
        ids = torch.from_numpy(raw_i).long()
        raw = torch.from_numpy(raw_d)
        dist = raw.clamp_min(0.0).sqrt() if self.metric == "l2" else 1.0 - raw
        # faiss marks missing results (k > ntotal) with id -1 and a sentinel distance.
        dist = dist.masked_fill(ids < 0, float("inf"))
        return dist.to(queries.device), ids.to(queries.device)
