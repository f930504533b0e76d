"""Dataset of image files decoded lazily with PIL (for datasets too large to hold in memory)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from robust_ranking.data.errors import DataConfigError, DataNotFoundError


class ImageFileDataset(Dataset):
    """Items ``(transform(RGB PIL image), label, index)``; ``transform`` must return a float tensor in [0,1].

    ``labels`` is an int64 tensor available without decoding any image (the class-balanced sampler
    needs it). A file that is missing or cannot be decoded (truncated, corrupt, not an image) is one
    :class:`data.DataConfigError` naming it.
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
        image = self.transform(read_rgb_image(self.paths[index]))
        return image, self.labels[index], torch.tensor(index, dtype=torch.int64)

    def subset(self, indices: Tensor | Sequence[int]) -> "ImageFileDataset":
        """A new dataset over ``indices`` (same transform); its items are re-indexed from 0."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageFileDataset([self.paths[i] for i in idx.tolist()], self.labels[idx], self.transform)

    def with_transform(self, transform: Callable[[Image.Image], Tensor]) -> "ImageFileDataset":
        """The same files and labels with another transform (e.g. the non-augmented eval view)."""
        return ImageFileDataset(self.paths, self.labels, transform)


def read_rgb_image(path: Path) -> Image.Image:
    """The decoded RGB image at ``path``; a missing or undecodable file is a one-line
    :class:`data.DataConfigError` naming it (:class:`data.DataNotFoundError` when missing)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # decodes the whole file: truncation shows up here
    except FileNotFoundError:
        raise DataNotFoundError(f"image {path} does not exist: re-extract the dataset archive") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataConfigError(f"image {path} cannot be decoded ({reason}): re-extract the dataset archive") from None
