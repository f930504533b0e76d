"""Stanford Online Products (Song et al., CVPR 2016): 120k eBay product photos, 22.6k classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import transforms

from robust_ranking.data.errors import DataConfigError
from robust_ranking.data.image_file_dataset import ImageFileDataset
from robust_ranking.data.retrieval_datamodule import RetrievalDataModule

SOP_FOLDER = "Stanford_Online_Products"
_SPLIT_FILES = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}


class StanfordOnlineProductsDataModule(RetrievalDataModule):
    """SOP read from ``root`` (the folder with ``Ebay_train.txt`` / ``Ebay_test.txt``, or its parent).

    Images are decoded lazily with PIL as RGB, resized on the shortest side to ``image_size`` and
    center-cropped to ``[3, image_size, image_size]``; with ``augment`` the training split instead gets
    a resize to ``image_size * 8/7``, a random crop and a random horizontal flip. Labels are the
    ``class_id`` column remapped to ``0..C-1`` within each split (train and test classes are disjoint);
    ``num_classes`` is the number of training classes. Nothing is downloaded.

    ``samples_per_class`` defaults to 2 because most SOP classes have only 2 to 12 images.
    Use ``num_workers > 0``: decoding JPEGs dominates the cost.
    """

    def __init__(
        self,
        samples_per_class: int = 2,
        image_size: int = 224,
        augment: bool = False,
        **kwargs: Any,
    ) -> None:
        # the shared arguments (root, loaders, protocol, ...) are RetrievalDataModule's; jsonargparse
        # follows **kwargs into it, so the CLI still lists them
        super().__init__(samples_per_class=samples_per_class, **kwargs)
        if image_size < 1:
            raise DataConfigError(f"image_size must be >= 1, got {image_size}")
        self.image_size = image_size
        self.augment = augment
        self.image_shape = (3, image_size, image_size)

    def eval_transform(self) -> transforms.Compose:
        """Shortest-side resize + center crop, float [0, 1]."""
        size = self.image_size
        return transforms.Compose(
            [transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()]
        )

    def train_transform(self) -> transforms.Compose:
        """:meth:`eval_transform`, or resize/random-crop/flip when ``augment``."""
        if not self.augment:
            return self.eval_transform()
        size = self.image_size
        return transforms.Compose(
            [
                transforms.Resize(round(size * 8 / 7)),
                transforms.RandomCrop(size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
            ]
        )

    def resolve_folder(self) -> Path:
        """The folder holding ``Ebay_train.txt`` and ``Ebay_test.txt``."""
        if self.root is None:
            raise FileNotFoundError(
                "Stanford Online Products needs --data.root pointing at the Stanford_Online_Products folder "
                "(with Ebay_train.txt, Ebay_test.txt and the image folders); it is not downloaded "
                "automatically"
            )
        root = Path(self.root).expanduser()
        for folder in (root, root / SOP_FOLDER):
            if all((folder / name).is_file() for name in _SPLIT_FILES.values()):
                return folder
        raise FileNotFoundError(
            f"no Ebay_train.txt / Ebay_test.txt in {root} or {root / SOP_FOLDER}: "
            "point --data.root at the extracted Stanford_Online_Products folder"
        )

    @staticmethod
    def read_split_file(path: Path) -> tuple[list[Path], np.ndarray]:
        """``(image paths, class ids)`` from an ``Ebay_*.txt`` file; paths are relative to its folder."""
        lines = path.read_text().splitlines()
        header = lines[0].split() if lines else []
        if header[:4] != ["image_id", "class_id", "super_class_id", "path"]:
            raise DataConfigError(
                f"{path}: expected the header 'image_id class_id super_class_id path', got {lines[:1]}"
            )
        rows = [line.split() for line in lines[1:] if line.strip()]
        if not rows or any(len(r) != 4 for r in rows):
            raise DataConfigError(
                f"{path}: expected non-empty rows of 4 columns 'image_id class_id super_class_id path'"
            )
        paths = [path.parent / r[3] for r in rows]
        class_ids = np.array([int(r[1]) for r in rows], dtype=np.int64)
        return paths, class_ids

    def load_splits(self) -> tuple[ImageFileDataset, ImageFileDataset]:
        folder = self.resolve_folder()

        def load(split: str, transform: transforms.Compose) -> ImageFileDataset:
            paths, class_ids = self.read_split_file(folder / _SPLIT_FILES[split])
            _, labels = np.unique(class_ids, return_inverse=True)  # class ids -> 0..C-1 within the split
            return ImageFileDataset(paths, torch.from_numpy(labels.astype(np.int64)), transform)

        return load("train", self.train_transform()), load("test", self.eval_transform())

    def eval_view(self, dataset: ImageFileDataset) -> ImageFileDataset:  # type: ignore[override]
        return dataset.with_transform(self.eval_transform())
