"""The candidate pool X as the attacks see it: clean embeddings computed once by the caller."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Gallery", "QuerySet"]


@dataclass(frozen=True)
class Gallery:
    """Clean ``embed()`` outputs of the gallery X and their labels.

    The evaluation engine embeds X once per checkpoint and reuses this object for every
    attack and epsilon. In the ECCV 2020 protocol X is also the query set, so attacked
    candidates / queries are gallery members, addressed by their gallery index.

    Attributes:
        embeddings: ``[N, D]`` clean embeddings (stored detached).
        labels: ``[N]`` class labels (unused by the ranking attacks, kept for metrics).
    """

    embeddings: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.embeddings.dim() != 2:
            raise ValueError(f"Gallery.embeddings must be [N, D], got shape {tuple(self.embeddings.shape)}")
        if self.labels.dim() != 1 or self.labels.shape[0] != self.embeddings.shape[0]:
            raise ValueError(
                f"Gallery.labels must be [N={self.embeddings.shape[0]}], got shape {tuple(self.labels.shape)}"
            )
        object.__setattr__(self, "embeddings", self.embeddings.detach())

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    def to(self, device: torch.device | str) -> Gallery:
        return Gallery(self.embeddings.to(device), self.labels.to(device))


@dataclass(frozen=True)
class QuerySet:
    """The queries a universal perturbation is fitted or measured on: ``images [N, C, H, W]`` in
    ``[0, 1]``, their ``indices [N]`` in X (for the target draws and to exclude each query from its
    own ranking) and their ``labels [N]`` (the retrieval objectives of UAP-IR need them).

    Both universal attacks take ``(model, gallery, fit, unseen=None)`` with these.
    """

    images: Tensor
    indices: Tensor
    labels: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.indices.shape != (n,):
            raise ValueError(f"QuerySet.indices must be [N={n}], got shape {tuple(self.indices.shape)}")
        if self.labels is not None and self.labels.shape != (n,):
            raise ValueError(f"QuerySet.labels must be [N={n}], got shape {tuple(self.labels.shape)}")
