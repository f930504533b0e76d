"""The batch type every loader of this package yields, and the collate function that builds it."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.utils.data import default_collate


class RetrievalBatch(NamedTuple):
    """``(images, labels, indices)``: float32 images in [0, 1] ``[B, C, H, W]``, int64 labels ``[B]`` and
    int64 ``indices`` ``[B]`` (each sample's position in the dataset it was drawn from).

    A ``NamedTuple`` so that ``x, y, idx = batch`` and ``batch[0]`` keep working, and Lightning's
    device transfer (which rebuilds named tuples) moves all three fields.
    """

    images: Tensor
    labels: Tensor
    indices: Tensor


def collate_retrieval_batch(samples: RetrievalBatch | Sequence[Any]) -> RetrievalBatch:
    """Collate function for the loaders of this package.

    Datasets that fetch whole batches at once (``__getitems__``, e.g. :class:`TensorImageDataset`)
    already return a :class:`RetrievalBatch`: it is passed through unchanged. A list of per-sample
    ``(image, label, index)`` tuples (lazily decoded image files) is stacked as usual.
    """
    if isinstance(samples, RetrievalBatch):
        return samples
    images, labels, indices = default_collate(list(samples))
    return RetrievalBatch(images, labels.to(torch.int64), indices.to(torch.int64))
