"""Datasets as tensors for the single-process runners (universal, transfer) and their input checks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from robust_ranking.attacks.attack import frozen_eval
from robust_ranking.data.retrieval_batch import collate_retrieval_batch
from robust_ranking.evaluation.engine import InvalidInputError, separate_codes

__all__ = ["NonFiniteEmbeddingsError", "check_embeddings", "check_images", "encode_all", "gallery_tensors"]


def gallery_tensors(datamodule: Any, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """X (``datamodule.eval_set``) as ``(images [N, C, H, W], labels [N])``, in index order."""
    loader = DataLoader(datamodule.eval_set, batch_size=batch_size, shuffle=False,
                        collate_fn=collate_retrieval_batch)
    images, labels = [], []
    for batch in loader:
        images.append(batch[0])
        labels.append(batch[1])
    return torch.cat(images), torch.cat(labels)


def check_images(images: Tensor, where: object) -> None:
    """Raise :class:`evaluation.engine.InvalidInputError` (one line) for NaN / inf images or pixels
    outside [0, 1], naming their indices, before any attack runs."""
    flat = images.flatten(1)
    bad = torch.nonzero(~(torch.isfinite(flat) & (flat >= 0) & (flat <= 1)).all(dim=1)).reshape(-1).tolist()
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        raise InvalidInputError(f"{where}: {len(bad)} of {len(flat)} images are not valid attack inputs "
                                f"(NaN / inf, or outside [0, 1]): indices {shown}")


class NonFiniteEmbeddingsError(ValueError):
    """A model embeds X with NaN / inf values: no universal or transfer report can be computed from it
    (``eval.py``: one line, exit status 3)."""


def check_embeddings(embeddings: Tensor, where: object) -> None:
    """Raise :class:`NonFiniteEmbeddingsError` if a row of ``embeddings`` holds a NaN / inf."""
    bad = int((~torch.isfinite(embeddings.flatten(1))).any(dim=1).sum())
    if bad:
        raise NonFiniteEmbeddingsError(f"{where}: {bad} of {embeddings.shape[0]} gallery embeddings are NaN / inf; "
                                       "no report can be computed from them")


@torch.no_grad()
def encode_all(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor | None:
    """``model.encode`` of ``images`` in batches when it differs from ``embed`` (PQ / hashing), else ``None``."""
    if not separate_codes(model):
        return None
    with frozen_eval(model):
        return torch.cat([model.encode(images[s : s + batch_size]) for s in range(0, images.shape[0], batch_size)])
