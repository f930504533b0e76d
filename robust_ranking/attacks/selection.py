"""Target selection for the ranking attacks (ECCV 2020 Sec. 4), deterministic per sample index.

The protocol draws, for every attacked sample, a random set of targets: the w queries Q of
CA+ / the m candidates C of QA+ uniformly from X, and those of CA- / QA- from the top-1% of the
attacked sample's clean ranking. A stateful RNG would make the draw depend on batch size,
batch order and on how samples are sharded over processes. Instead each
``(seed, stream, attacked sample, gallery item)`` gets a counter-based pseudo-random key, and
"draw k without replacement from an allowed set" is "the k allowed items with the smallest
keys". The draw of a sample is then a pure function of its own index.

The key is a chain of 32-bit integer mixers (Chris Wellons' "lowbias32" constants) computed
with int64 torch ops. Every intermediate value is kept below 2^49, so nothing overflows on
any device, and the keys are bit-identical on CPU and GPU. For a fixed sample the map
gallery index -> key is a bijection on 32-bit integers, so keys within a row never tie.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor

__all__ = [
    "keys",
    "keyed_uniform",
    "nearest_excluding",
    "random_targets",
    "top_percent_targets",
    "stream_salt",
]

_M32 = 0xFFFFFFFF
_MAX_INDEX = 2**31  # gallery / sample indices must stay below this (32-bit mixing domain)


def _mul32(x, c: int):
    """``(x * c) mod 2^32`` for ``0 <= x < 2^32`` without int64 overflow (16-bit limbs of c).

    Works for Python ints and int64 tensors alike.
    """
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """lowbias32: a bijective 32-bit avalanche mixer (values in and out in [0, 2^32))."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_salt(stream: int | str) -> int:
    """A 32-bit salt for a named stream ("CA+", "QA-/start", ...) or an integer stream id."""
    if isinstance(stream, str):
        return zlib.crc32(stream.encode("utf-8")) & _M32
    return int(stream) & _M32


def _seed_word(seed: int, stream: int | str) -> int:
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    h = _mix32(stream_salt(stream) ^ 0x9E3779B9)
    h = _mix32(h ^ (seed & _M32))
    return _mix32(h ^ (seed >> 32))


def _check_indices(t: Tensor, name: str) -> Tensor:
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    t = t.long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= _MAX_INDEX):
        raise ValueError(f"{name} must be in [0, 2^31)")
    return t


def keys(seed: int, sample_index: Tensor, gallery_index: Tensor, stream: int | str = 0) -> Tensor:
    """Counter-based pseudo-random keys ``[B, N]`` (int64 in ``[0, 2^32)``).

    Args:
        seed: any Python int (64 bits used).
        sample_index: ``[B]`` indices of the attacked samples.
        gallery_index: ``[N]`` gallery indices shared by all rows, or ``[B, N]`` per row.
        stream: salt that separates independent draws (attack kind, random start, ...).

    ``keys(...)[b, j]`` depends only on ``(seed, stream, sample_index[b], gallery_index[..., j])``.
    """
    s = _check_indices(sample_index, "sample_index")
    g = _check_indices(gallery_index, "gallery_index").to(s.device)
    if s.dim() != 1 or g.dim() not in (1, 2):
        raise ValueError("sample_index must be [B] and gallery_index [N] or [B, N]")
    h = _mix32(s ^ _seed_word(seed, stream))[:, None]  # [B, 1] per-sample word
    # Two rounds so that two samples' key rows are not XOR-translates of each other.
    k = _mix32(h ^ (g if g.dim() == 2 else g[None, :]))
    return _mix32((k + h) & _M32)


def keyed_uniform(seed: int, sample_index: Tensor, shape: tuple[int, ...], stream: int | str = 0,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform ``[0, 1)`` noise ``[B, *shape]`` that depends only on each sample's index.

    Used for per-sample random starts that are independent of batching. 24 random bits per
    value (exactly representable in float32).
    """
    n = math.prod(shape)
    k = keys(seed, sample_index, torch.arange(n, device=sample_index.device), stream)
    return ((k >> 8).to(dtype) / float(1 << 24)).view(-1, *shape)


def _smallest_keys(key: Tensor, allowed: Tensor, k: int) -> Tensor:
    """Column positions of the ``k`` allowed entries with the smallest keys, per row ``[B, k]``."""
    key = key.masked_fill(~allowed, torch.iinfo(torch.int64).max)  # keys < 2^32, so never ties
    return torch.sort(key, dim=1, stable=True).indices[:, :k]


def _check_k(k: int, available: int, what: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k > available:
        raise ValueError(f"cannot select {k} {what}: only {available} are allowed")


def random_targets(seed: int, sample_idx: Tensor, n_gallery: int, k: int, exclude_self: bool = True,
                   stream: int | str = 0) -> Tensor:
    """``k`` distinct gallery indices per sample, uniform from X (minus the sample itself).

    Q for CA+ and C for QA+ (ECCV 2020 Sec. 4: "randomly sampled from X"). Returns a
    ``LongTensor [B, k]``, ordered by key; for a fixed sample the draw for ``k`` is a
    prefix of the draw for ``k + 1``.
    """
    _check_k(k, n_gallery - int(exclude_self), "random targets")
    s = _check_indices(sample_idx, "sample_idx")
    gallery = torch.arange(n_gallery, device=s.device)
    allowed = torch.ones(s.shape[0], n_gallery, dtype=torch.bool, device=s.device)
    if exclude_self:
        allowed &= gallery[None, :] != s[:, None]
    return _smallest_keys(keys(seed, s, gallery, stream), allowed, k)


def nearest_excluding(distances: Tensor, k: int, exclude: Tensor | None = None) -> Tensor:
    """The ``k`` nearest gallery indices per row ``[B, k]``, excluded entries skipped.

    Ties in distance are broken by the smaller gallery index (stable sort), so the result is
    deterministic; an excluded entry never enters, whatever its distance (also inf / nan).
    """
    if distances.dim() != 2:
        raise ValueError(f"distances must be [B, N], got shape {tuple(distances.shape)}")
    n = distances.shape[1]
    if exclude is None or distances.shape[0] == 0:
        available = n
    else:
        available = int((~exclude).sum(1).min())
    _check_k(k, available, "nearest items")
    order = torch.sort(distances, dim=1, stable=True).indices
    if exclude is not None:
        # Second stable sort on the "excluded" flag moves excluded items last, keeping the
        # distance order (and index tie-breaking) among the allowed ones.
        flag = exclude.gather(1, order).to(torch.uint8)
        order = order.gather(1, torch.sort(flag, dim=1, stable=True).indices)
    return order[:, :k]


def top_percent_targets(seed: int, sample_idx: Tensor, clean_distances: Tensor, k: int, percent: float = 1.0,
                        stream: int | str = 0) -> Tensor:
    """``k`` distinct indices per sample, uniform from the top ``percent``% of its clean ranking.

    Q for CA- (``{q in X | R(c, q) <= 1%}``) and C for QA- (``{c in X | R(q, c) <= 1%}``),
    ECCV 2020 Sec. 4. ``clean_distances[b]`` is the clean distance row of attacked sample b
    to the whole gallery ``[B, N]``. The pool is the ``max(k, ceil(percent / 100 * N))``
    nearest items with the attacked sample itself excluded and distance ties broken by
    gallery index; the k targets are the pool members with the smallest keys.
    """
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0.0 < percent <= 100.0:
        raise ValueError(f"percent must be in (0, 100], got {percent!r}")
    s = _check_indices(sample_idx, "sample_idx")
    if clean_distances.dim() != 2 or clean_distances.shape[0] != s.shape[0]:
        shape = tuple(clean_distances.shape)
        raise ValueError(f"clean_distances must be [B={s.shape[0]}, N], got shape {shape}")
    n = clean_distances.shape[1]
    _check_k(k, n - 1, "top-ranked targets")
    pool_size = min(max(k, math.ceil(percent * n / 100.0 - 1e-9)), n - 1)
    is_self = torch.arange(n, device=s.device)[None, :] == s.to(clean_distances.device)[:, None]
    pool = nearest_excluding(clean_distances, pool_size, exclude=is_self)  # [B, P]
    chosen = _smallest_keys(keys(seed, s, pool, stream), torch.ones_like(pool, dtype=torch.bool), k)
    return pool.gather(1, chosen)
