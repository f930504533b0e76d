"""Dataset of image files decoded lazily with PIL (for datasets too large to hold in memory)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset


class ImageFileDataset(Dataset):
    """Items ``(transform(RGB PIL image), label, index)``; ``transform`` must return a float tensor in [0,1].

    ``labels`` is an int64 tensor available without decoding any image (the class-balanced sampler
    needs it).
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Tensor | Sequence[int],
        transform: Callable[[Image.Image], Tensor],
    ) -> None:
        labels = torch.as_tensor(labels).to(torch.int64)
        if labels.shape != (len(paths),):
            raise ValueError(f"got {len(paths)} paths but labels of shape {tuple(labels.shape)}")
        self.paths = [Path(p) for p in paths]
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        index = int(index)
        if index < 0:
            index += len(self)
        with Image.open(self.paths[index]) as img:
            image = self.transform(img.convert("RGB"))
        return image, self.labels[index], torch.tensor(index, dtype=torch.int64)

    def subset(self, indices: Tensor | Sequence[int]) -> "ImageFileDataset":
        """A new dataset over ``indices`` (same transform); its items are re-indexed from 0."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageFileDataset([self.paths[i] for i in idx.tolist()], self.labels[idx], self.transform)

    def with_transform(self, transform: Callable[[Image.Image], Tensor]) -> "ImageFileDataset":
        """The same files and labels with another transform (e.g. the non-augmented eval view)."""
        return ImageFileDataset(self.paths, self.labels, transform)
