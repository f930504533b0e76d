"""Splitting the universal attacks (and the transfer runner) over the ranks of a DDP run.

The caller passes *collectives*, any object with ``world_size``, ``rank`` and
``all_gather(t) -> [world_size, *t.shape]`` (every rank's tensor in rank order; every rank passes
the same shape and dtype), e.g. :class:`evaluation.engine.Collectives` /
:class:`evaluation.engine.StrategyCollectives`. ``None`` means one process, and then every
function here is the plain single-process computation (no padding, no copies).

Two kinds of work, two splits (both give every rank the same, complete result):

- **Measurements** (per-sample metrics, embeddings, adversarial images of independent attack
  batches) are split by whole batches: rank r takes batches r, r + W, ... of the set cut in
  index order into batches of ``batch_size`` -- the very batches, hence the very forward shapes,
  of one process -- and the rows are gathered back into index order by copying. So these values
  are bit-identical to world size 1 on any backend.
- **A fit step** of a universal perturbation needs the gradient of one batch's summed loss
  w.r.t. the one shared r before the next step. The batch is split into W contiguous slices,
  each rank computes its samples' *per-sample input gradients*, those rows are gathered in
  sample order and summed over the batch with the same reduction (``g.sum(0)``) that autograd
  applies to the broadcast ``x + r`` in one process: the reduction order is fixed whatever W.
  What can still differ is a sample's own gradient: it is computed in a forward of
  ``ceil(B / W)`` rows instead of B, and a backend may pick another kernel for another batch
  size (CPU oneDNN for LeNet / C2F1: one class for 2..15 rows, another for 16+; cuDNN likewise),
  which changes the last float bits. See :func:`shard_slice`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["batch_starts", "gather_rows", "is_distributed", "map_batches", "pad_rows", "reduce_batch_gradient",
           "shard_slice", "single"]


class _Single:
    world_size = 1
    rank = 0

    def all_gather(self, tensor: Tensor) -> Tensor:
        return tensor.unsqueeze(0)


def single(collectives: Any) -> Any:
    """``collectives``, or the one-process stand-in for ``None``."""
    return _Single() if collectives is None else collectives


def is_distributed(collectives: Any) -> bool:
    return collectives is not None and int(collectives.world_size) > 1


def batch_starts(n: int, batch_size: int) -> list[int]:
    return list(range(0, n, batch_size))


_WIRE = {torch.float32, torch.float64, torch.int64}  # what gloo and NCCL both gather


def gather_rows(collectives: Any, local: Tensor, positions: Tensor, total: int, width: int) -> Tensor:
    """Every rank's ``local`` rows put at their ``positions`` in a ``[total, ...]`` tensor (an exact copy).

    ``positions`` (``[k]``, ``-1`` = drop the row) index ``0 .. total - 1``; ``width`` >= every rank's
    ``k`` (the same on every rank). Every position must be covered by exactly one rank.
    """
    dtype = local.dtype
    wire = local if dtype in _WIRE else local.to(torch.float64 if dtype.is_floating_point else torch.int64)
    k = wire.shape[0]
    padded = wire.new_zeros((width, *wire.shape[1:]))
    padded[:k] = wire
    pos = torch.full((width,), -1, dtype=torch.int64, device=wire.device)
    pos[:k] = positions.to(wire.device)
    values = collectives.all_gather(padded)
    values = values.reshape(-1, *values.shape[2:])
    where = collectives.all_gather(pos).reshape(-1)
    keep = where >= 0
    out = values.new_zeros((total, *values.shape[1:]))
    out[where[keep]] = values[keep]
    if int(keep.sum()) != total:
        raise RuntimeError(f"gather_rows: {int(keep.sum())} rows gathered for {total} positions")
    return out.to(dtype)


def map_batches(collectives: Any, n: int, batch_size: int,
                fn: Callable[[int, int], dict[str, Tensor]]) -> dict[str, Tensor]:
    """``fn(start, stop)`` over the batches of ``0 .. n - 1`` (index order), rows concatenated in order.

    ``fn`` returns per-row tensors (``[stop - start, ...]``). One process: every batch, here.
    W processes: this rank's batches (r, r + W, ...), gathered on every rank by copying, so the
    result is the one-process result bit for bit. A rank with fewer batches than the others runs
    the last batch again in its spare slot and drops it: every rank needs the shapes and the keys,
    and the collectives must be joined the same number of times.
    """
    starts = batch_starts(n, batch_size)
    if not is_distributed(collectives):
        outs = [fn(s, min(s + batch_size, n)) for s in starts]
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]} if outs else {}
    world, rank = int(collectives.world_size), int(collectives.rank)
    slots = math.ceil(len(starts) / world)
    outs, positions = [], []
    for slot in range(slots):
        b = slot * world + rank
        s = starts[b] if b < len(starts) else starts[-1]
        e = min(s + batch_size, n)
        out = fn(s, e)
        outs.append(out)
        idx = torch.arange(s, e)
        positions.append(idx if b < len(starts) else torch.full_like(idx, -1))
    pos = torch.cat(positions)
    return {k: gather_rows(collectives, torch.cat([o[k] for o in outs]), pos, n, slots * batch_size)
            for k in outs[0]}


def shard_slice(collectives: Any, batch_len: int) -> tuple[int, int, int]:
    """This rank's contiguous slice ``[start, stop)`` of a fit batch of ``batch_len`` rows, and the
    slice width every rank computes at (``ceil(batch_len / W)``: the caller pads a short slice with
    :func:`pad_rows`; a rank whose slice is empty sends zero rows)."""
    world, rank = int(collectives.world_size), int(collectives.rank)
    width = math.ceil(batch_len / world)
    start = min(rank * width, batch_len)
    return start, min(start + width, batch_len), width


def pad_rows(rows: Tensor, width: int) -> Tensor:
    """``rows`` (at least one) cycled up to ``width`` rows (the extra rows' outputs are dropped).

    Per-sample attacks keyed by sample index make a repeated row an identical, independent instance.
    """
    if rows.shape[0] >= width:
        return rows[:width]
    return rows[torch.arange(width, device=rows.device) % rows.shape[0]]


def reduce_batch_gradient(collectives: Any, grads: Tensor, start: int, stop: int, batch_len: int,
                          width: int) -> Tensor:
    """Sum over a fit batch of its per-sample input gradients: ``grads`` holds this rank's rows
    (``[width, ...]``, the first ``stop - start`` real); the rows of every rank are gathered in
    sample order and summed with ``.sum(0)``, as one process reduces its whole batch."""
    positions = torch.arange(start, start + width)
    positions[stop - start:] = -1
    full = gather_rows(collectives, grads, positions, batch_len, width)
    return full.sum(0)
