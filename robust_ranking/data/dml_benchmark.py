"""Shared base of the deep-metric-learning image benchmarks (CUB-200-2011, Cars196, Stanford Online
Products): official archive layouts read from a local folder, the standard DML transforms, the
zero-shot split (train and test classes disjoint), class-balanced training batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import transforms

from robust_ranking.data.errors import DataConfigError, DataNotFoundError
from robust_ranking.data.image_file_dataset import ImageFileDataset
from robust_ranking.data.retrieval_datamodule import RetrievalDataModule

#: The eval resize of the standard DML pipeline for 224 crops (shortest side 256, center crop 224).
_RESIZE_RATIO = 256 / 224


class DMLBenchmarkDataModule(RetrievalDataModule):
    """A benchmark stored as image files plus annotation files under ``root``; nothing is downloaded.

    Transforms (the standard DML pipeline; images stay float in [0, 1], the model normalizes):

    * training (``augment``, the default): ``RandomResizedCrop(image_size)`` + random horizontal flip;
    * evaluation (test split, and the training split when it is the database): shortest side resized
      to ``resize_size`` (default ``image_size * 256 / 224``, i.e. 256 for 224) + ``CenterCrop(image_size)``.

    ``augment=False`` serves the training split with the evaluation transform.

    Labels are the dataset's class ids remapped to ``0..C-1`` within each split (the classes of the two
    splits are disjoint); ``num_classes`` is the number of training classes.

    Every listed image is checked to exist when the data is loaded (one ``stat`` per file); an image
    that cannot be decoded is reported when it is read. Both are one-line
    :class:`data.DataConfigError` naming the file. Use ``num_workers > 0``: JPEG decoding dominates.

    Subclasses implement :meth:`find_folder` (the dataset folder under ``root``) and
    :meth:`read_annotations` (``(train paths, train class ids, test paths, test class ids)``).
    """

    #: Name used in messages.
    dataset_name: str = "the dataset"
    #: What ``--data.root`` should point at, for messages.
    root_hint: str = "the extracted dataset folder"

    def __init__(
        self,
        image_size: int = 224,
        resize_size: int | None = None,
        augment: bool = True,
        **kwargs: Any,
    ) -> None:
        # the shared arguments (root, loaders, protocol, ...) are RetrievalDataModule's; jsonargparse
        # follows **kwargs into it, so the CLI still lists them
        super().__init__(**kwargs)
        if image_size < 1:
            raise DataConfigError(f"image_size must be >= 1, got {image_size}")
        if resize_size is None:
            resize_size = round(image_size * _RESIZE_RATIO)
        if resize_size < image_size:
            raise DataConfigError(f"resize_size ({resize_size}) must be >= image_size ({image_size})")
        self.image_size = image_size
        self.resize_size = resize_size
        self.augment = augment
        self.image_shape = (3, image_size, image_size)

    # ----------------------------------------------------------------- transforms
    def eval_transform(self) -> transforms.Compose:
        """Shortest side to ``resize_size``, center crop ``image_size``, float [0, 1]."""
        return transforms.Compose(
            [transforms.Resize(self.resize_size), transforms.CenterCrop(self.image_size), transforms.ToTensor()]
        )

    def train_transform(self) -> transforms.Compose:
        """``RandomResizedCrop(image_size)`` + horizontal flip, or :meth:`eval_transform` without ``augment``."""
        if not self.augment:
            return self.eval_transform()
        return transforms.Compose(
            [
                transforms.RandomResizedCrop(self.image_size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
            ]
        )

    # ----------------------------------------------------------------- files
    def root_path(self) -> Path:
        """``root`` as a path; a :class:`data.DataNotFoundError` when it is not given or not a folder."""
        if self.root is None:
            raise DataNotFoundError(
                f"{self.dataset_name} needs --data.root pointing at {self.root_hint}; it is not downloaded "
                "automatically (README, 'Real benchmarks')"
            )
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise DataNotFoundError(
                f"--data.root {root} is not a folder: point it at {self.root_hint} (README, 'Real benchmarks')"
            )
        return root

    def find_folder(self, root: Path) -> Path:
        """The dataset folder under ``root`` (``root`` itself or a known subfolder)."""
        raise NotImplementedError

    def read_annotations(self, folder: Path) -> tuple[list[Path], np.ndarray, list[Path], np.ndarray]:
        """``(train paths, train class ids, test paths, test class ids)`` from the annotation files."""
        raise NotImplementedError

    @staticmethod
    def check_files_exist(paths: list[Path], source: str) -> None:
        """A :class:`data.DataNotFoundError` naming the first listed image that is not there."""
        missing = [p for p in paths if not p.is_file()]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise DataNotFoundError(
                f"image {missing[0]} listed in {source} does not exist{more}: re-extract the dataset archive"
            )

    # ----------------------------------------------------------------- RetrievalDataModule hooks
    def load_splits(self) -> tuple[ImageFileDataset, ImageFileDataset]:
        folder = self.find_folder(self.root_path())
        train_paths, train_ids, test_paths, test_ids = self.read_annotations(folder)
        for split, paths in (("training", train_paths), ("test", test_paths)):
            if not paths:
                raise DataConfigError(f"{self.dataset_name} in {folder}: the {split} split is empty")

        def build(paths: list[Path], class_ids: np.ndarray, transform: transforms.Compose) -> ImageFileDataset:
            _, labels = np.unique(class_ids, return_inverse=True)  # class ids -> 0..C-1 within the split
            return ImageFileDataset(paths, torch.from_numpy(labels.astype(np.int64)), transform)

        return build(train_paths, train_ids, self.train_transform()), build(test_paths, test_ids, self.eval_transform())

    def eval_view(self, dataset: ImageFileDataset) -> ImageFileDataset:  # type: ignore[override]
        return dataset.with_transform(self.eval_transform())
