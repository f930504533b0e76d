"""Helpers of the SDHA scripts: load a DCH run (checkpoint + its LightningCLI config), encode splits."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data import RetrievalDataModule, collate_retrieval_batch  # noqa: E402
from evaluation import checkpoints  # noqa: E402
from evaluation.errors import EvaluationError  # noqa: E402
from lightning_modules import DCHRanker  # noqa: E402


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


@torch.no_grad()
def encode_set(model: DCHRanker, dataset: Dataset, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """``(sign codes [N, K], labels [N])`` of a whole dataset."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_retrieval_batch)
    codes, labels = [], []
    for x, y, _ in loader:
        codes.append(model.encode(x))
        labels.append(y)
    return torch.cat(codes), torch.cat(labels)
