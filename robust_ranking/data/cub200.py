"""CUB-200-2011 (Wah et al. 2011): 11,788 photos of 200 bird species, the DML zero-shot split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from robust_ranking.data.dml_benchmark import DMLBenchmarkDataModule
from robust_ranking.data.errors import DataConfigError, DataNotFoundError

CUB_FOLDER = "CUB_200_2011"
#: Classes 1..100 train, 101..200 test (the zero-shot DML split of Oh Song et al. 2016).
CUB_TRAIN_CLASSES = 100


def read_id_table(path: Path, what: str) -> dict[int, str]:
    """``{id: value}`` from a two-column ``<id> <value>`` file of the CUB archive."""
    table: dict[int, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataConfigError(f"{path}, line {number}: expected '<image_id> <{what}>', got {line.strip()[:80]!r}")
        table[int(parts[0])] = parts[1].strip()
    if not table:
        raise DataConfigError(f"{path} is empty: re-extract the CUB_200_2011 archive")
    return table


class CUB200DataModule(DMLBenchmarkDataModule):
    """CUB-200-2011 read from ``root``: the ``CUB_200_2011`` folder of the official archive
    (``CUB_200_2011.tgz``), or its parent.

    Official layout used: ``images.txt`` (``<image_id> <path>``, paths relative to ``images/``, e.g.
    ``001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg``), ``image_class_labels.txt``
    (``<image_id> <class_id>``, class ids 1..200) and ``images/``. ``train_test_split.txt`` (the
    classification split) is not used: the DML split trains on classes 1-100 (5,864 images) and
    tests on classes 101-200 (5,924 images).

    Transforms, labels and errors: :class:`DMLBenchmarkDataModule`.
    """

    dataset_name = "CUB-200-2011"
    root_hint = "the CUB_200_2011 folder (with images.txt, image_class_labels.txt and images/)"

    def find_folder(self, root: Path) -> Path:
        for folder in (root, root / CUB_FOLDER):
            if (folder / "images.txt").is_file() and (folder / "image_class_labels.txt").is_file():
                return folder
        raise DataNotFoundError(
            f"no images.txt / image_class_labels.txt in {root} or {root / CUB_FOLDER}: "
            "point --data.root at the extracted CUB_200_2011 folder"
        )

    def read_annotations(self, folder: Path) -> tuple[list[Path], np.ndarray, list[Path], np.ndarray]:
        images = read_id_table(folder / "images.txt", "path")
        labels = read_id_table(folder / "image_class_labels.txt", "class_id")
        if images.keys() != labels.keys():
            missing = sorted(images.keys() ^ labels.keys())
            raise DataConfigError(
                f"{folder}: images.txt and image_class_labels.txt list different image ids "
                f"(e.g. {missing[0]}); re-extract the CUB_200_2011 archive"
            )
        ids = sorted(images)
        try:
            class_ids = np.array([int(labels[i]) for i in ids], dtype=np.int64)
        except ValueError:
            raise DataConfigError(f"{folder / 'image_class_labels.txt'}: class ids must be integers") from None
        paths = [folder / "images" / images[i] for i in ids]
        self.check_files_exist(paths, str(folder / "images.txt"))
        train = class_ids <= CUB_TRAIN_CLASSES
        return (
            [p for p, t in zip(paths, train) if t], class_ids[train],
            [p for p, t in zip(paths, train) if not t], class_ids[~train],
        )
