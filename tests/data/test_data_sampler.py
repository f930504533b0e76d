"""ClassBalancedBatchSampler: balance, DDP sharding, determinism, coverage."""

import numpy as np
import pytest
import torch

from robust_ranking.data import ClassBalancedBatchSampler


def _labels(num_classes: int = 10, per_class: int = 60, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.permutation(np.repeat(np.arange(num_classes), per_class))


def _assert_balanced(batch: list[int], labels: np.ndarray, batch_size: int, m: int) -> None:
    assert len(batch) == batch_size
    classes, counts = np.unique(labels[batch], return_counts=True)
    assert len(classes) == batch_size // m
    assert (counts == m).all()


def test_batches_are_class_balanced_and_contiguous_per_class():
    labels = _labels()
    sampler = ClassBalancedBatchSampler(labels, batch_size=32, samples_per_class=4, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 600 // 32
    for batch in batches:
        _assert_balanced(batch, labels, 32, 4)
        # laid out as P runs of m same-class indices
        assert (labels[batch].reshape(8, 4) == labels[batch][::4, None]).all()


def test_world_size_two_disjoint_equal_length_and_covering():
    labels = _labels()
    ranks = [ClassBalancedBatchSampler(labels, 32, 4, num_replicas=2, rank=r, seed=1) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == (600 // 32) // 2
    for sampler in ranks:
        sampler.set_epoch(5)
    seen = [np.concatenate(list(s)) for s in ranks]
    assert len(list(ranks[0])) == len(list(ranks[1])) == len(ranks[0])
    assert not set(seen[0]) & set(seen[1])  # no sample on both ranks
    for s in seen:
        assert len(np.unique(s)) == len(s)  # and no repeat within a rank
    covered = len(set(seen[0]) | set(seen[1]))
    assert covered >= 0.9 * len(labels)


def test_rank_batches_interleave_one_global_schedule():
    labels = _labels()
    global_schedule = ClassBalancedBatchSampler(labels, 32, 4, num_replicas=2, rank=0).global_schedule(2)
    for r in (0, 1):
        sampler = ClassBalancedBatchSampler(labels, 32, 4, num_replicas=2, rank=r)
        sampler.set_epoch(2)
        assert [list(b) for b in global_schedule[r::2]] == list(sampler)


def test_deterministic_per_seed_and_epoch_and_changes_across_epochs():
    labels = _labels()

    def run(seed: int, epoch: int) -> list[list[int]]:
        sampler = ClassBalancedBatchSampler(labels, 32, 4, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert run(0, 0) == run(0, 0)
    assert run(0, 1) == run(0, 1)
    assert run(0, 0) != run(0, 1)
    assert run(0, 0) != run(1, 0)


def test_epoch_covers_most_of_the_dataset_without_repeats():
    labels = _labels(num_classes=10, per_class=101)  # 101 % 4 leftovers sit out
    sampler = ClassBalancedBatchSampler(labels, batch_size=40, samples_per_class=4)
    seen = np.concatenate(list(sampler))
    assert len(np.unique(seen)) == len(seen)
    assert len(seen) >= 0.95 * len(labels)


def test_imbalanced_classes_stay_balanced_and_small_classes_use_replacement():
    labels = np.concatenate([np.zeros(200, dtype=np.int64), np.repeat(np.arange(1, 41), 3)])
    sampler = ClassBalancedBatchSampler(torch.as_tensor(labels), batch_size=16, samples_per_class=4)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        _assert_balanced(batch, labels, 16, 4)


def test_invalid_configurations_raise_clear_errors():
    labels = _labels()
    with pytest.raises(ValueError, match="divisible"):
        ClassBalancedBatchSampler(labels, batch_size=30, samples_per_class=4)
    with pytest.raises(ValueError, match="distinct classes"):
        ClassBalancedBatchSampler(labels, batch_size=48, samples_per_class=4)  # 12 classes > 10
    with pytest.raises(ValueError, match="rank"):
        ClassBalancedBatchSampler(labels, 32, 4, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="cannot fill"):
        ClassBalancedBatchSampler(_labels(per_class=4), 32, 4, num_replicas=4)


def test_lightning_reaches_set_epoch_through_sampler_attribute():
    from lightning_fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    sampler = ClassBalancedBatchSampler(_labels(), 32, 4)
    loader = DataLoader(range(600), batch_sampler=sampler)
    _set_sampler_epoch(loader, 7)  # what Lightning's fit loop calls at every epoch start
    assert sampler.epoch == 7
