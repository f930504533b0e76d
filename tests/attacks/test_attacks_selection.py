"""Per-sample-index target selection (robust_ranking/attacks/selection.py) and the normalized rank (robust_ranking/attacks/ranks.py)."""

from __future__ import annotations

import math

import pytest
import torch

from robust_ranking.attacks import (
    keyed_uniform,
    keys,
    nearest_excluding,
    normalized_rank,
    random_targets,
    top_percent_targets,
)


def test_keys_are_deterministic_per_sample_and_distinct_per_row() -> None:
    g = torch.arange(1000)
    k = keys(7, torch.tensor([3, 7, 9]), g, stream="CA+")
    assert k.dtype == torch.int64 and k.shape == (3, 1000)
    assert k.min() >= 0 and k.max() < 2**32
    # Row of a sample does not depend on which other samples are in the batch, or their order.
    torch.testing.assert_close(k[1], keys(7, torch.tensor([7]), g, stream="CA+")[0], rtol=0, atol=0)
    torch.testing.assert_close(k[[2, 0]], keys(7, torch.tensor([9, 3]), g, stream="CA+"), rtol=0, atol=0)
    for row in k:  # a bijection of 32-bit integers: no ties inside a row
        assert row.unique().numel() == row.numel()
    # Different seeds / streams / samples give different keys.
    assert not torch.equal(k, keys(8, torch.tensor([3, 7, 9]), g, stream="CA+"))
    assert not torch.equal(k, keys(7, torch.tensor([3, 7, 9]), g, stream="QA+"))
    assert not torch.equal(k[0], k[1])


def test_keys_handle_large_seeds_and_per_row_gallery_indices() -> None:
    s = torch.tensor([0, 5])
    g2 = torch.tensor([[1, 2, 3], [4, 5, 6]])
    k = keys(2**63 + 12345, s, g2)
    full = keys(2**63 + 12345, s, torch.arange(7))
    torch.testing.assert_close(k, full.gather(1, g2), rtol=0, atol=0)


def test_keyed_uniform_range_and_rough_uniformity() -> None:
    u = keyed_uniform(0, torch.arange(20), (1, 10, 10))
    assert u.shape == (20, 1, 10, 10) and u.dtype == torch.float32
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.02
    assert abs(u.var().item() - 1 / 12) < 0.01


def test_random_targets_distinct_exclude_self_and_roughly_uniform() -> None:
    n, k = 50, 5
    samples = torch.arange(n).repeat(40)  # duplicates: same sample -> same draw
    t = random_targets(1, torch.arange(2000), n, k, stream="CA+")
    assert t.shape == (2000, k) and t.dtype == torch.int64
    assert not (t == torch.arange(2000)[:, None]).any()
    assert all(row.unique().numel() == k for row in t[:100])
    counts = torch.bincount(t.flatten(), minlength=n).float()
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()
    td = random_targets(1, samples, n, k)
    assert not (td == samples[:, None]).any()
    torch.testing.assert_close(td[:n], td[n : 2 * n], rtol=0, atol=0)


def test_random_targets_batch_independent_and_prefix_property() -> None:
    full = random_targets(3, torch.tensor([3, 7, 9]), 100, 4, stream="QA+")
    for i, s in enumerate([3, 7, 9]):
        torch.testing.assert_close(random_targets(3, torch.tensor([s]), 100, 4, stream="QA+")[0], full[i],
                                   rtol=0, atol=0)
    shuffled = random_targets(3, torch.tensor([9, 3, 7]), 100, 4, stream="QA+")
    torch.testing.assert_close(shuffled, full[[2, 0, 1]], rtol=0, atol=0)
    assert torch.equal(random_targets(3, torch.tensor([3, 7, 9]), 100, 2, stream="QA+"), full[:, :2])
    assert not torch.equal(full, random_targets(3, torch.tensor([3, 7, 9]), 100, 4, stream="CA+"))


def test_nearest_excluding_stable_ties_and_exclusions() -> None:
    d = torch.tensor([[0.5, 0.1, 0.1, 0.0, 0.3], [1.0, 1.0, 1.0, 1.0, 1.0]])
    ex = torch.tensor([[False, False, False, True, False], [True, False, False, False, False]])
    assert nearest_excluding(d, 3, ex).tolist() == [[1, 2, 4], [1, 2, 3]]
    with pytest.raises(ValueError, match="cannot select"):
        nearest_excluding(d, 5, ex)


def test_top_percent_targets_pool_and_determinism() -> None:
    g = torch.Generator().manual_seed(0)
    n = 300
    samples = torch.tensor([3, 7, 9, 100])
    d = torch.rand(4, n, generator=g)
    d[torch.arange(4), samples] = 0.0  # self is the nearest and must be skipped
    pool_size = math.ceil(0.01 * n)  # 3
    t = top_percent_targets(5, samples, d, 2, percent=1.0, stream="CA-")
    for i in range(4):
        dd = d[i].clone()
        dd[samples[i]] = math.inf
        pool = set(torch.argsort(dd, stable=True)[:pool_size].tolist())
        assert set(t[i].tolist()) <= pool and len(set(t[i].tolist())) == 2
    # k larger than the 1% pool: the pool grows to k (i.e. the k nearest).
    t5 = top_percent_targets(5, samples, d, 5, percent=1.0)
    for i in range(4):
        dd = d[i].clone()
        dd[samples[i]] = math.inf
        assert set(t5[i].tolist()) == set(torch.argsort(dd, stable=True)[:5].tolist())
    # Batch-independence.
    t1 = top_percent_targets(5, samples[2:3], d[2:3], 2, percent=1.0, stream="CA-")
    assert torch.equal(t1[0], t[2])


def test_top_percent_targets_covers_the_whole_pool() -> None:
    n = 1000
    d = torch.arange(n, dtype=torch.float32).repeat(400, 1)  # same ranking for all
    samples = torch.arange(500, 900)
    t = top_percent_targets(0, samples, d, 1, percent=1.0)
    assert set(t.flatten().tolist()) == set(range(10))  # every member of the top-10 gets drawn


def test_selection_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="k must be"):
        random_targets(0, torch.tensor([0]), 10, 0)
    with pytest.raises(ValueError, match="cannot select"):
        random_targets(0, torch.tensor([0]), 10, 10)
    with pytest.raises(ValueError, match="percent"):
        top_percent_targets(0, torch.tensor([0]), torch.rand(1, 10), 1, percent=0.0)
    with pytest.raises(ValueError, match="integer"):
        keys(0, torch.tensor([0.5]), torch.arange(3))


def test_normalized_rank_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    b, k, n = 4, 3, 37
    d_gallery = torch.rand(b, k, n, generator=g).round(decimals=1)  # many ties
    d_target = torch.rand(b, k, generator=g).round(decimals=1)
    mask = torch.rand(b, k, n, generator=g) < 0.2
    got = normalized_rank(d_target, d_gallery, mask)
    for i in range(b):
        for j in range(k):
            count = sum(1 for x in range(n) if not mask[i, j, x] and d_gallery[i, j, x] < d_target[i, j])
            assert got[i, j].item() == pytest.approx(100.0 * count / n)
    # Broadcast gallery row [B, 1, N] against per-target values, no mask.
    got2 = normalized_rank(d_target, d_gallery[:, :1, :])
    ref = (d_gallery[:, :1, :] < d_target[..., None]).sum(-1) * 100.0 / n
    torch.testing.assert_close(got2, ref.float())
