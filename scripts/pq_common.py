"""Helpers of ``scripts/pq_kmeans_checkpoint.py``: a ranker checkpoint and its run config, and the
Fashion-MNIST query / database split of docs/dpqn.md (on whose database the k-means codebooks are fitted).

A checkpoint is rebuilt from the ``model`` section of its run's ``config.yaml`` (LightningCLI
saves it next to ``checkpoints/``) and its state dict is loaded strictly, through the engine's one
safe loader. (The PQ-AG tables themselves come from eval.py reports: ``scripts/pq_ag_table.py``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor

from robust_ranking.data import FashionMNISTDataModule
from robust_ranking.evaluation import checkpoints
from robust_ranking.evaluation.errors import EvaluationError
from robust_ranking.lightning_modules import Ranker


@dataclass
class Split:
    """Images ``[N, 1, 28, 28]`` in [0, 1] and labels ``[N]`` of the query set or the database."""

    images: Tensor
    labels: Tensor


def run_config(ckpt: str | Path) -> dict:
    """The ``config.yaml`` of a checkpoint's run (``<run>/checkpoints/x.ckpt`` -> ``<run>/config.yaml``)."""
    ckpt = Path(ckpt)
    config = (ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent) / "config.yaml"
    if not ckpt.is_file() or not config.is_file():
        raise SystemExit(f"error: need a checkpoint and its run config.yaml: {ckpt} / {config}")
    return yaml.safe_load(config.read_text())


def load_ranker(ckpt: str | Path) -> Ranker:
    """The ranker of a checkpoint (CPU, eval mode): :func:`evaluation.checkpoints.load_ranker`, the one
    safe loader (weights_only, allow-listed class paths) with the run config's ``model`` as fallback."""
    ckpt = Path(ckpt)
    run_config(ckpt)  # the scripts need the run config (its data section) as well: refuse early without it
    try:
        model_section, _, where = checkpoints.run_config(ckpt, None)
        return checkpoints.load_ranker(ckpt, model_section, where).eval()
    except EvaluationError as err:
        raise SystemExit(f"error: {err}") from None


def query_database(num_queries: int = 1000, database: str = "test_rest", seed: int = 0) -> tuple[Split, Split]:
    """The Fashion-MNIST query set and database of docs/dpqn.md (1000 test queries, seed 0;
    the other 9000 test images are the database)."""
    dm = FashionMNISTDataModule(protocol="query_database", num_queries=num_queries, database=database, seed=seed,
                                eval_batch_size=1000)
    dm.setup()

    def stack(loader) -> Split:
        images, labels = zip(*[(x, y) for x, y, _ in loader])
        return Split(torch.cat(images), torch.cat(labels))

    return stack(dm.query_dataloader()), stack(dm.database_dataloader())


@torch.no_grad()
def batched(fn, images: Tensor, batch_size: int = 1000) -> Tensor:
    """``fn`` over ``images`` in batches, concatenated."""
    return torch.cat([fn(images[s : s + batch_size]) for s in range(0, len(images), batch_size)])
