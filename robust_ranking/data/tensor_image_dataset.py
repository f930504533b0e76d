"""In-memory image dataset (uint8 storage, float conversion per batch)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from robust_ranking.data.retrieval_batch import RetrievalBatch


class TensorImageDataset(Dataset):
    """Images held in memory as a ``uint8`` tensor ``[N, C, H, W]`` with int64 ``labels`` ``[N]``.

    Items are ``(image float32 [C,H,W] in [0,1], label, index)``. Small datasets (MNIST-like,
    CIFAR-10) stay uint8 in memory (4x smaller than float) and are converted per batch.

    ``__getitems__`` returns a whole collated :class:`RetrievalBatch` with one tensor gather, so the
    DataLoader pays no per-sample Python cost; loaders over this dataset must therefore use
    :func:`data.collate_retrieval_batch` (the datamodules do), not torch's default collate.
    """

    def __init__(self, images: Tensor | np.ndarray, labels: Tensor | np.ndarray | Sequence[int]) -> None:
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels).to(torch.int64)
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (got {images.dtype}); scale to 0..255 first")
        if images.ndim == 3:  # [N, H, W] grey-scale -> [N, 1, H, W]
            images = images.unsqueeze(1)
        if images.ndim != 4:
            raise ValueError(f"images must have shape [N, C, H, W] or [N, H, W], got {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}], got {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        index = int(index)
        if index < 0:
            index += len(self)
        image = self.images[index].to(torch.float32).div_(255.0)
        return image, self.labels[index], torch.tensor(index, dtype=torch.int64)

    def __getitems__(self, indices: Sequence[int]) -> RetrievalBatch:
        """Fetch a whole batch at once (used by ``torch.utils.data.DataLoader`` when present)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        idx = torch.where(idx < 0, idx + len(self), idx)
        images = self.images.index_select(0, idx).to(torch.float32).div_(255.0)
        return RetrievalBatch(images, self.labels.index_select(0, idx), idx)

    def subset(self, indices: Tensor | Sequence[int]) -> "TensorImageDataset":
        """A new dataset holding ``self[indices]``; its items are re-indexed from 0."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return TensorImageDataset(self.images.index_select(0, idx), self.labels.index_select(0, idx))
