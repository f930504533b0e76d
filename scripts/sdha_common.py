"""Helpers for the SDHA tests and studies: load a DCH run (checkpoint + its LightningCLI config), fetch images.

The SDHA tables themselves are read from eval.py reports (``scripts/sdha_tables.py``,
``scripts/sdha_clean_map.py``), which need none of this."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from robust_ranking.data import RetrievalDataModule, collate_retrieval_batch
from robust_ranking.evaluation import checkpoints
from robust_ranking.evaluation.errors import EvaluationError
from robust_ranking.lightning_modules import DCHRanker


def run_config(ckpt: Path) -> dict[str, Any]:
    """The ``config.yaml`` LightningCLI saved next to ``<run>/checkpoints/``."""
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    path = run / "config.yaml"
    if not path.is_file():
        raise SystemExit(f"error: no run config {path} for checkpoint {ckpt}")
    return yaml.safe_load(path.read_text())


def load_run(ckpt: str | Path, data_overrides: dict[str, Any] | None = None) -> tuple[DCHRanker, RetrievalDataModule]:
    """``(model in eval mode, set-up data module)`` of a DCH training run."""

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise SystemExit(f"error: checkpoint {ckpt} does not exist")
    cfg = run_config(ckpt)
    data_cfg = dict(cfg["data"])
    data_cfg["init_args"] = {**data_cfg.get("init_args", {}), **(data_overrides or {})}
    try:  # the one safe loader: weights_only, allow-listed class paths, run config as fallback
        model = checkpoints.load_ranker(ckpt, cfg.get("model"), str(ckpt))
        datamodule = checkpoints.instantiate(data_cfg, RetrievalDataModule, "data", str(ckpt))
    except EvaluationError as err:
        raise SystemExit(f"error: {err}") from None
    if not isinstance(model, DCHRanker):
        raise SystemExit(f"error: {ckpt} is not a DCHRanker run (got {type(model).__name__})")
    datamodule.setup()
    return model.eval(), datamodule


def images_of(dataset: Dataset, indices: Tensor | None = None, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` of ``dataset`` (or of its items ``indices``), in order."""
    subset = dataset if indices is None else torch.utils.data.Subset(dataset, indices.tolist())
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate_retrieval_batch)
    xs, ys = [], []
    for x, y, _ in loader:
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)
