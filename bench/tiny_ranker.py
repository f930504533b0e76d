"""The tests' tiny ranker (``tests/conftest.py``'s ``train_tiny_ranker``), for the benchmarks.

A copy, so that ``bench/`` imports nothing from ``tests/``: LeNet(16-d) with a cosine triplet loss,
trained for ``epochs`` epochs with Adam on the synthetic data (well under a second, one thread).
Keep it in step with ``tests/conftest.py`` (``bench/sanity_budget.py``'s numbers are that ranker's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import TripletMarginLoss

from robust_ranking.data import SyntheticDataModule
from robust_ranking.lightning_modules import LeNet, MetricRanker


@dataclass
class TinyRanker:
    model: MetricRanker
    datamodule: SyntheticDataModule


def train_tiny_ranker(epochs: int = 2, seed: int = 0, lr: float = 1e-3) -> TinyRanker:
    """``LeNet(embedding_dim=16)`` trained outside Lightning: Adam over the training batches, the ranker's loss."""
    datamodule = SyntheticDataModule(test_per_class=25, eval_batch_size=64, seed=seed)
    datamodule.setup()
    torch.manual_seed(seed)
    model = MetricRanker(LeNet(embedding_dim=16), TripletMarginLoss(margin=0.2, distance=CosineSimilarity()))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for images, labels, _ in datamodule.train_dataloader():
            loss = model.compute_loss(model.embed(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return TinyRanker(model, datamodule)
