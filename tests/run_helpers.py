"""Helpers of the tests: a plain training loop for tiny models, and tiny train.py / eval.py runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robust_ranking.cli import train


def fit_with_adam(model: nn.Module, datamodule: Any, epochs: int, lr: float = 1e-3) -> None:
    """Train a ranker outside Lightning: Adam over the data module's training batches, the
    ranker's own loss on its embeddings (the tests' tiny models train in well under a second)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for images, labels, _ in datamodule.train_dataloader():
            loss = model.compute_loss(model.embed(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def train_in(root: Path, args: list[str]) -> None:
    """``train.py <args>`` with ``root`` as the working directory, so ``runs/`` lands there."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        train.main(args)
    finally:
        os.chdir(cwd)


def report_numbers(report: dict[str, Any]) -> dict[str, Any]:
    """An eval.py report without its wall times (which differ from run to run)."""
    results = [{k: v for k, v in r.items() if k != "wall_s"} for r in report["results"]]
    return {"results": results, "clean": report["clean"], "score": report["robustness_score"],
            "T": report["num_samples"], "indices": report["attacked_indices"],
            "clean_query_database": report.get("clean_query_database")}
