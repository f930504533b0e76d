"""Class-balanced (P classes x m samples) batch sampler that shards itself across DDP ranks."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from robust_ranking.data.errors import DataConfigError


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Yields batches of dataset indices with ``P = batch_size // samples_per_class`` distinct classes and
    ``m = samples_per_class`` samples of each, laid out as P consecutive runs of m same-class indices.

    One epoch's schedule is a function of ``(seed, epoch)`` only:

    * each class's indices are shuffled and cut into disjoint groups of m (the ``n_c % m`` left over
      sit the epoch out; a class with fewer than m items forms one group drawn with replacement);
    * batches take P groups of distinct classes, classes drawn in proportion to their unused groups,
      with a feasibility rule that always leaves enough distinct classes for the remaining batches --
      so no group is used twice and the epoch has a fixed, known length;
    * every rank builds the same global schedule and takes batches ``rank, rank + W, rank + 2W, ...``:
      ranks get disjoint samples and exactly the same number of batches (DDP never waits on a rank).

    ``len()`` is the number of batches per epoch on this rank (about ``N / batch_size / W``).
    Call :meth:`set_epoch` before each epoch (Lightning does, through the ``sampler`` attribute).

    A batch larger than the whole dataset, or ``samples_per_class`` larger than every class (so that
    no class can give m distinct samples), could only be filled by drawing with replacement: that is
    refused unless ``sample_with_replacement`` asks for it. Invalid settings raise
    :class:`data.DataConfigError` naming the argument and the fix.
    """

    def __init__(
        self,
        labels: Tensor | np.ndarray | Sequence[int],
        batch_size: int,
        samples_per_class: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        sample_with_replacement: bool = False,
    ) -> None:
        check_batch_arguments(batch_size, samples_per_class)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank ({rank}) must be in [0, num_replicas={num_replicas})")
        if seed < 0:
            raise DataConfigError(f"seed must be >= 0, got {seed}")
        labels_np = torch.as_tensor(labels).cpu().numpy().astype(np.int64, copy=False)
        if labels_np.ndim != 1 or labels_np.size == 0:
            raise DataConfigError("the training split is empty: labels must be a non-empty 1-D sequence of class ids")

        self.batch_size = batch_size
        self.samples_per_class = samples_per_class
        self.classes_per_batch = batch_size // samples_per_class
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.sample_with_replacement = sample_with_replacement
        self.epoch = 0
        # Lightning calls `set_epoch` on `dataloader.sampler` and `dataloader.batch_sampler.sampler`, never
        # on the batch sampler itself (lightning_fabric.utilities.data._set_sampler_epoch): be our own
        # `.sampler` so that its per-epoch call reaches us.
        self.sampler = self

        _, self._class_of, counts = np.unique(labels_np, return_inverse=True, return_counts=True)
        self._counts = counts
        self._num_samples = labels_np.size
        num_classes = counts.size
        if num_classes < self.classes_per_batch:
            raise DataConfigError(
                f"a training batch needs {self.classes_per_batch} distinct classes (batch_size {batch_size} / "
                f"samples_per_class {samples_per_class}) but the training split has only {num_classes}; "
                f"lower batch_size to at most {num_classes * samples_per_class} or raise samples_per_class"
            )
        if not sample_with_replacement:
            replace_hint = "or set sample_with_replacement=true to draw repeated samples on purpose"
            if batch_size > labels_np.size:
                raise DataConfigError(
                    f"batch_size ({batch_size}) is larger than the training split ({labels_np.size} samples): "
                    f"lower batch_size to at most {labels_np.size}, {replace_hint}"
                )
            if samples_per_class > counts.max():
                raise DataConfigError(
                    f"samples_per_class ({samples_per_class}) is larger than every class of the training split "
                    f"(the largest has {int(counts.max())} samples): lower samples_per_class, {replace_hint}"
                )
        # Sorting by class once; each epoch only reshuffles within classes.
        self._class_start = np.concatenate(([0], np.cumsum(counts)[:-1]))
        self._groups_per_class = np.maximum(counts // samples_per_class, 1)
        self._group_offset = np.concatenate(([0], np.cumsum(self._groups_per_class)[:-1]))
        total = self._max_feasible_batches()
        self._batches_per_rank = total // num_replicas
        if self._batches_per_rank == 0:
            raise DataConfigError(
                f"the dataset ({labels_np.size} samples, {num_classes} classes) cannot fill one "
                f"class-balanced batch of {batch_size} per rank for {num_replicas} rank(s); lower batch_size"
            )

    def _max_feasible_batches(self) -> int:
        """Largest b such that b batches of P distinct-class groups exist: sum_c min(g_c, b) >= P * b.

        The left side minus the right is concave in b and 0 at b = 0, so the feasible b form an interval.
        """
        g, p = self._groups_per_class, self.classes_per_batch
        lo, hi = 0, int(g.sum()) // p
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if int(np.minimum(g, mid).sum()) >= p * mid:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose schedule the next ``iter()`` yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._batches_per_rank

    def __iter__(self) -> Iterator[list[int]]:
        schedule = self.global_schedule(self.epoch)
        for batch in schedule[self.rank :: self.num_replicas]:
            yield batch.tolist()

    def global_schedule(self, epoch: int) -> np.ndarray:
        """All ranks' batches of ``epoch`` as an int64 array ``[num_replicas * len(self), batch_size]``."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        m, p = self.samples_per_class, self.classes_per_batch
        counts, g = self._counts, self._groups_per_class

        # Random order within each class: shuffle, then stable-sort by class.
        perm = rng.permutation(self._num_samples)
        perm = perm[np.argsort(self._class_of[perm], kind="stable")]

        # Group table [G, m] of positions into `perm`: class c's groups are consecutive slices of its block.
        group_class = np.repeat(np.arange(counts.size), g)
        within = np.arange(group_class.size) - self._group_offset[group_class]
        pos = self._class_start[group_class, None] + within[:, None] * m + np.arange(m)[None, :]
        small = np.flatnonzero(counts[group_class] < m)
        if small.size:  # too few items for a group: draw m with replacement
            c = group_class[small]
            draws = (rng.random((small.size, m)) * counts[c, None]).astype(np.int64)
            pos[small] = self._class_start[c, None] + draws
        members = perm[pos]

        total = self._batches_per_rank * self.num_replicas
        schedule = np.empty((total, self.batch_size), dtype=np.int64)
        remaining = g.astype(np.int64)
        used = np.zeros_like(remaining)
        for i in range(total):
            batches_left = total - i
            with np.errstate(divide="ignore"):
                # Gumbel top-P of log(remaining): P classes drawn without replacement ~ unused groups.
                keys = np.log(remaining) + rng.gumbel(size=remaining.size)
            # Keep the rest of the epoch feasible: a class with >= batches_left unused groups may only be
            # skipped while there is slack in sum_c min(remaining_c, batches_left) - P * batches_left.
            tight = np.flatnonzero(remaining >= batches_left)
            slack = int(np.minimum(remaining, batches_left).sum()) - p * batches_left
            n_forced = tight.size - slack
            if n_forced > 0:
                keys[tight[np.argpartition(-keys[tight], n_forced - 1)[:n_forced]]] = np.inf
            chosen = np.argpartition(-keys, p - 1)[:p]
            schedule[i] = members[self._group_offset[chosen] + used[chosen]].reshape(-1)
            used[chosen] += 1
            remaining[chosen] -= 1
        return schedule


def check_batch_arguments(batch_size: int, samples_per_class: int) -> None:
    """Refuse a ``batch_size`` / ``samples_per_class`` pair no class-balanced batch can have.

    Raises :class:`data.DataConfigError` naming the argument and a valid value.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, (int, np.integer)) or samples_per_class < 1:
        raise DataConfigError(f"samples_per_class must be a positive integer, got {samples_per_class!r}")
    if batch_size % samples_per_class != 0:
        lower = batch_size // samples_per_class * samples_per_class
        choices = f"{lower} or {lower + samples_per_class}" if lower else f"{samples_per_class}"
        raise DataConfigError(
            f"batch_size ({batch_size}) must be divisible by samples_per_class ({samples_per_class}), as each "
            f"training batch holds batch_size / samples_per_class classes: use batch_size {choices}, "
            "or change samples_per_class"
        )
