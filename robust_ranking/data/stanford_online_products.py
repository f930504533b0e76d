"""Stanford Online Products (Song et al., CVPR 2016): 120k eBay product photos, 22.6k classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from robust_ranking.data.dml_benchmark import DMLBenchmarkDataModule
from robust_ranking.data.errors import DataConfigError, DataNotFoundError

SOP_FOLDER = "Stanford_Online_Products"
_SPLIT_FILES = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}


class StanfordOnlineProductsDataModule(DMLBenchmarkDataModule):
    """SOP read from ``root`` (the folder with ``Ebay_train.txt`` / ``Ebay_test.txt``, or its parent).

    The official layout (``Stanford_Online_Products.zip``): ``Ebay_train.txt`` / ``Ebay_test.txt``
    (header ``image_id class_id super_class_id path``, paths relative to the folder, e.g.
    ``bicycle_final/111085122871_0.JPG``) and the twelve ``<category>_final/`` image folders. The
    official split is the DML split: classes 1-11318 train, 11319-22634 test.

    Transforms, labels and error reporting: :class:`DMLBenchmarkDataModule` (standard DML pipeline,
    ``RandomResizedCrop`` + flip for training unless ``augment=False``, resize 256 + center crop 224
    for evaluation). Nothing is downloaded.

    ``samples_per_class`` defaults to 2 because most SOP classes have only 2 to 12 images.
    """

    dataset_name = "Stanford Online Products"
    root_hint = "the Stanford_Online_Products folder (with Ebay_train.txt, Ebay_test.txt and the image folders)"

    def __init__(self, samples_per_class: int = 2, **kwargs: Any) -> None:
        # image_size / resize_size / augment are DMLBenchmarkDataModule's, the loader arguments
        # RetrievalDataModule's; jsonargparse follows **kwargs into both
        super().__init__(samples_per_class=samples_per_class, **kwargs)

    def resolve_folder(self) -> Path:
        """The folder holding ``Ebay_train.txt`` and ``Ebay_test.txt``."""
        return self.find_folder(self.root_path())

    def find_folder(self, root: Path) -> Path:
        for folder in (root, root / SOP_FOLDER):
            if all((folder / name).is_file() for name in _SPLIT_FILES.values()):
                return folder
        raise DataNotFoundError(
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
        try:
            class_ids = np.array([int(r[1]) for r in rows], dtype=np.int64)
        except ValueError:
            raise DataConfigError(f"{path}: the class_id column must hold integers") from None
        return paths, class_ids

    def read_annotations(self, folder: Path) -> tuple[list[Path], np.ndarray, list[Path], np.ndarray]:
        splits = []
        for split in ("train", "test"):
            source = folder / _SPLIT_FILES[split]
            paths, class_ids = self.read_split_file(source)
            self.check_files_exist(paths, str(source))
            splits += [paths, class_ids]
        return splits[0], splits[1], splits[2], splits[3]
