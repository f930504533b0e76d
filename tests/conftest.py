"""Shared fixtures: a tiny ranker trained for a moment on synthetic data."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import TripletMarginLoss

from robust_ranking.data import SyntheticDataModule
from robust_ranking.lightning_modules import LeNet, MetricRanker
from run_helpers import fit_with_adam


def pytest_configure(config: pytest.Config) -> None:
    # Tests run tiny tensors on a shared 2-core runner: extra intra-op threads only contend. Set
    # here, before any fixture trains a model, and re-asserted before every test below.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    """One intra-op thread per test: Lightning's DDP launchers raise the count in the launching
    process, so a test after one of them must not inherit it."""
    torch.set_num_threads(1)


@dataclass
class TinyRanker:
    """A LeNet(16-d) cosine-triplet ranker and its synthetic data (|X| = 100, 4 classes)."""

    model: MetricRanker
    datamodule: SyntheticDataModule


def train_tiny_ranker(epochs: int = 2, seed: int = 0) -> TinyRanker:
    """Train ``LeNet(embedding_dim=16)`` for a few steps (well under a second, one thread)."""
    datamodule = SyntheticDataModule(test_per_class=25, eval_batch_size=64, seed=seed)
    datamodule.setup()
    torch.manual_seed(seed)
    model = MetricRanker(LeNet(embedding_dim=16), TripletMarginLoss(margin=0.2, distance=CosineSimilarity()))
    fit_with_adam(model, datamodule, epochs)
    model.eval()
    for p in model.parameters():
        p.grad = None
    return TinyRanker(model, datamodule)


@pytest.fixture(scope="session")
def tiny_ranker() -> TinyRanker:
    return train_tiny_ranker()
