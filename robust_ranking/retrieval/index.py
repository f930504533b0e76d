"""Exact nearest-neighbour search indexes over retrieval codes.

Two implementations of the :class:`RetrievalIndex` protocol:

- :class:`TorchFlatIndex` -- brute force with any ``distance(a, b) -> [A, B]`` callable, on
  whatever device the codes live (works for every code type: float, PQ, packed binary).
  Ties are broken by gallery index, like the metrics in :mod:`retrieval.metrics`.
- :class:`FaissFlatIndex` -- exact faiss ``IndexFlatL2`` / ``IndexFlatIP`` on float32 codes,
  on the GPU when the installed faiss supports it. Ties are broken by stored index too: faiss's
  answer is widened until the k-th distance's whole tie group is inside it, then sorted by
  ``(distance, id)`` (:func:`faiss_stable_search`).

Both return ``(distances [Q, k] float, indices [Q, k] long)`` sorted closest first, on the
queries' device. When ``k`` exceeds the number of stored items, the missing slots are padded
with distance ``+inf`` and index ``-1`` (faiss's convention for the index).

Large galleries (docs/evaluation.md, "Large galleries and GPU faiss"): the metrics switch from the
brute-force torch ranking to a faiss index (:func:`search_backend` decides, :func:`index_search_chunks`
runs it) for galleries of more than :data:`FAISS_MIN_GALLERY` items.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal, Protocol, runtime_checkable

import faiss
import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FAISS_MIN_GALLERY",
    "GPU_MAX_K",
    "MAX_BLOCK_ELEMENTS",
    "FaissFlatIndex",
    "RetrievalIndex",
    "TorchFlatIndex",
    "faiss_gpu_available",
    "faiss_stable_search",
    "index_search_chunks",
    "query_chunk_rows",
    "search_backend",
    "stable_topk",
]

#: Galleries with more items than this are ranked through a faiss index (the ranker's
#: ``build_index``: IndexFlat, IndexBinaryFlat, IndexPQ) instead of the brute-force torch matrix.
#: At or below it the metrics keep the exact torch path bit for bit (every golden number is far below).
FAISS_MIN_GALLERY = 50_000
#: Largest ``k`` a GPU faiss search serves (faiss's GPU k-selection limit, ``GPU_MAX_SELECTION_K``);
#: larger ``k`` (e.g. the whole ranking for mAP) is searched on the CPU index or by torch on the GPU.
GPU_MAX_K = 2048
#: Above :data:`FAISS_MIN_GALLERY`, query chunks hold at most this many ``query x gallery`` entries
#: (2^26: 256 MiB of float32 distances plus the ids), whatever the gallery size.
MAX_BLOCK_ELEMENTS = 1 << 26


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


def search_backend(
    num_gallery: int, k: int, device: torch.device | str, threshold: int | None = None
) -> Literal["torch", "faiss-cpu", "faiss-gpu"]:
    """How the metrics rank ``k`` results per query in a gallery of ``num_gallery`` codes on ``device``.

    - ``"torch"``: the brute-force torch path (distance matrix in query chunks + stable sort), on
      the codes' device -- for galleries of at most ``threshold`` items (default
      :data:`FAISS_MIN_GALLERY`); for long lists, ``k > GPU_MAX_K`` (the whole ranking mAP needs:
      GPU faiss cannot select that many, and CPU faiss with ``k = N`` measured 2x slower than the
      torch sort, 60k gallery); and on CUDA without GPU faiss (no device-to-host copy for CPU faiss);
    - ``"faiss-gpu"``: codes on CUDA and GPU faiss present (:func:`faiss_gpu_available`);
    - ``"faiss-cpu"``: codes on the CPU.
    """
    threshold = FAISS_MIN_GALLERY if threshold is None else int(threshold)
    if num_gallery <= threshold or k > GPU_MAX_K:
        return "torch"
    if torch.device(device).type == "cuda":
        return "faiss-gpu" if faiss_gpu_available() else "torch"
    return "faiss-cpu"


def query_chunk_rows(num_gallery: int, chunk_size: int, max_elements: int = MAX_BLOCK_ELEMENTS) -> int:
    """Queries per block: ``chunk_size``, lowered so a block holds at most ``max_elements`` entries."""
    return max(1, min(int(chunk_size), max_elements // max(int(num_gallery), 1)))


def faiss_stable_search(
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    x: np.ndarray,
    k: int,
    ntotal: int,
    convert: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` of a faiss search, sorted by ``(distance, id)`` like :func:`stable_topk`.

    faiss keeps an arbitrary subset of the items tied at the k-th distance. Here each row is
    searched with a few more results than ``k``; a row is complete when its last result is strictly
    farther than its k-th (so every item at the k-th distance is in the answer) or when it holds
    the whole index; incomplete rows are searched again with twice as many. Ties are judged on the
    returned distances ``convert(raw [Q, k'] float32 tensor)`` (monotone non-decreasing along faiss's
    order, e.g. ``sqrt`` of squared L2, ``1 - inner product``), so a conversion that rounds two
    raw values together ties them, as the torch distances do. ``k <= ntotal``.
    """
    num_q = x.shape[0]
    dist = torch.empty(num_q, k, dtype=torch.float32)
    ids = torch.empty(num_q, k, dtype=torch.long)
    rows = np.arange(num_q)
    kk = min(ntotal, k + max(8, k // 8))
    while rows.size:
        raw_d, raw_i = search(np.ascontiguousarray(x[rows]), kk)
        d = convert(torch.from_numpy(np.ascontiguousarray(raw_d)).to(torch.float32))
        i = torch.from_numpy(np.ascontiguousarray(raw_i)).long()
        done = (d[:, -1] > d[:, k - 1]) | torch.tensor(kk >= ntotal)
        if bool(done.any()):
            d_done, i_done = d[done], i[done]
            by_id = torch.argsort(i_done, dim=1, stable=True)  # then a stable sort by distance:
            d_done, i_done = d_done.gather(1, by_id), i_done.gather(1, by_id)  # (distance, id) order
            order = torch.argsort(d_done, dim=1, stable=True)[:, :k]
            target = torch.from_numpy(rows[done.numpy()])
            dist[target], ids[target] = d_done.gather(1, order), i_done.gather(1, order)
        rows = rows[~done.numpy()]
        kk = min(ntotal, 2 * kk)
    return dist, ids


def index_search_chunks(
    index: RetrievalIndex, queries: Tensor, k: int, chunk_rows: int
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(start, distances [C, k], ids [C, k])`` of ``index.search`` over chunks of ``chunk_rows`` queries."""
    for start in range(0, queries.shape[0], chunk_rows):
        dist, ids = index.search(queries[start : start + chunk_rows], k)
        yield start, dist, ids


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

    Results are sorted by ``(distance, id)``: ties are broken by stored index, like the torch
    metrics (:func:`faiss_stable_search`). A GPU index keeps a CPU twin for searches with
    ``k > GPU_MAX_K`` (e.g. a whole ranking), which GPU faiss cannot serve.
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
        self._index: faiss.Index | None = None  # CPU index (always)
        self._gpu_index = None  # its GPU copy when use_gpu
        self._gpu_resources = None  # must outlive the GPU index

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    @staticmethod
    def _to_numpy(x: Tensor) -> np.ndarray:
        if x.dim() != 2:
            raise ValueError(f"faiss codes must be [N, D], got shape {tuple(x.shape)}")
        return np.ascontiguousarray(x.detach().to(torch.float32).cpu().numpy())

    def _build(self, dim: int) -> None:
        self._index = faiss.IndexFlatL2(dim) if self.metric == "l2" else faiss.IndexFlatIP(dim)
        if self.use_gpu:
            self._gpu_resources = faiss.StandardGpuResources()
            device = torch.cuda.current_device() if torch.cuda.is_available() else 0
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, device, self._index)

    def add(self, codes: Tensor) -> None:
        x = self._to_numpy(codes)
        if self._index is None:
            self._build(x.shape[1])
        elif x.shape[1] != self._index.d:
            raise ValueError(f"code dimension {x.shape[1]} != index dimension {self._index.d}")
        assert self._index is not None
        self._index.add(x)
        if self._gpu_index is not None:
            self._gpu_index.add(x)

    def reset(self) -> None:
        for index in (self._index, self._gpu_index):
            if index is not None:
                index.reset()

    def _convert(self, raw: Tensor) -> Tensor:
        return raw.clamp_min(0.0).sqrt() if self.metric == "l2" else 1.0 - raw

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        num_q = queries.shape[0]
        if self._index is None or self.ntotal == 0 or num_q == 0:
            empty_d = torch.empty(num_q, 0, dtype=torch.float32, device=queries.device)
            empty_i = torch.empty(num_q, 0, dtype=torch.long, device=queries.device)
            return _pad(empty_d, empty_i, k)
        cpu, gpu = self._index, self._gpu_index

        def raw_search(x: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
            return (gpu if (gpu is not None and kk <= GPU_MAX_K) else cpu).search(x, kk)

        kk = min(k, self.ntotal)
        dist, ids = faiss_stable_search(raw_search, self._to_numpy(queries), kk, self.ntotal, self._convert)
        dist, ids = _pad(dist, ids, k)
        return dist.to(queries.device), ids.to(queries.device)
