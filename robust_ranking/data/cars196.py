"""Cars196 (Stanford Cars, Krause et al. 2013): 16,185 photos of 196 car models, the DML zero-shot split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from robust_ranking.data.dml_benchmark import DMLBenchmarkDataModule
from robust_ranking.data.errors import DataConfigError, DataNotFoundError

#: Subfolders of ``root`` searched for the dataset besides ``root`` itself.
CARS_FOLDERS = ("cars196", "stanford_cars", "CARS196")
#: Classes 1..98 train, 99..196 test (the zero-shot DML split of Oh Song et al. 2016).
CARS_TRAIN_CLASSES = 98
#: The devkit's test annotations with labels (distributed separately from the devkit).
_DEVKIT_TEST_ANNOS = "cars_test_annos_withlabels.mat"


def read_mat_annotations(path: Path, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The ``annotations`` struct array of a Cars196 ``.mat`` file as ``{field: 1-d array}``.

    Read with ``scipy.io.loadmat`` (MATLAB v5 files hold no code); anything unreadable or missing a
    field is a one-line :class:`data.DataConfigError` naming the file.
    """
    from scipy.io import loadmat

    try:
        annotations: Any = loadmat(str(path), squeeze_me=True)["annotations"]
    except KeyError:
        raise DataConfigError(f"{path} has no 'annotations' struct: not a Cars196 annotation file") from None
    except Exception as err:  # noqa: BLE001 - scipy raises many types for a bad file; all mean "unreadable"
        reason = " ".join(str(err).split())[:120] or type(err).__name__
        raise DataConfigError(f"{path} cannot be read as a MATLAB file ({reason}): re-download it") from None
    annotations = np.atleast_1d(annotations)
    names = annotations.dtype.names or ()
    absent = [f for f in fields if f not in names]
    if absent:
        raise DataConfigError(f"{path}: the annotations lack the field(s) {', '.join(absent)} (found {list(names)})")
    return {f: np.atleast_1d(annotations[f]) for f in fields}


def _class_ids(values: np.ndarray, path: Path) -> np.ndarray:
    try:
        return np.array([int(v) for v in values], dtype=np.int64)
    except (TypeError, ValueError):
        raise DataConfigError(f"{path}: the 'class' field must hold integers") from None


class Cars196DataModule(DMLBenchmarkDataModule):
    """Cars196 read from ``root`` (or its ``cars196/`` / ``stanford_cars/`` subfolder), in either
    official layout:

    * ``cars_annos.mat`` + ``car_ims/`` (``car_ims.tgz``, the all-images release): the
      ``annotations`` struct's ``relative_im_path`` (e.g. ``car_ims/000001.jpg``) and ``class``
      (1..196) fields;
    * the devkit: ``devkit/cars_train_annos.mat`` + ``cars_train/`` and
      ``cars_test_annos_withlabels.mat`` (in ``root`` or ``devkit/``) + ``cars_test/``: their ``fname``
      and ``class`` fields; both halves are pooled.

    The classification train/test flags are not used: the DML split trains on classes 1-98 (8,054
    images) and tests on classes 99-196 (8,131 images). ``.mat`` files are read with scipy.

    Transforms, labels and errors: :class:`DMLBenchmarkDataModule`.
    """

    dataset_name = "Cars196"
    root_hint = "the folder with cars_annos.mat and car_ims/ (or the devkit layout: devkit/, cars_train/, cars_test/)"

    def find_folder(self, root: Path) -> Path:
        for folder in (root, *(root / name for name in CARS_FOLDERS)):
            if (folder / "cars_annos.mat").is_file() or (folder / "devkit" / "cars_train_annos.mat").is_file():
                return folder
        raise DataNotFoundError(
            f"no cars_annos.mat (or devkit/cars_train_annos.mat) in {root} or its {'/, '.join(CARS_FOLDERS)}/ "
            "subfolders: point --data.root at the folder holding cars_annos.mat and car_ims/"
        )

    def read_samples(self, folder: Path) -> tuple[list[Path], np.ndarray, list[str]]:
        """``(image paths, class ids, annotation file of each image)`` of all 16,185 images."""
        annos = folder / "cars_annos.mat"
        if annos.is_file():
            table = read_mat_annotations(annos, ("relative_im_path", "class"))
            paths = [folder / str(p) for p in table["relative_im_path"]]
            return paths, _class_ids(table["class"], annos), [str(annos)] * len(paths)
        train_annos = folder / "devkit" / "cars_train_annos.mat"
        test_annos = next(
            (p for p in (folder / _DEVKIT_TEST_ANNOS, folder / "devkit" / _DEVKIT_TEST_ANNOS) if p.is_file()), None
        )
        if test_annos is None:
            raise DataNotFoundError(
                f"{folder} has the devkit layout but no {_DEVKIT_TEST_ANNOS} (in {folder} or {folder / 'devkit'}): "
                "the devkit's cars_test_annos.mat has no labels; add the labelled file or use cars_annos.mat"
            )
        paths: list[Path] = []
        class_ids: list[np.ndarray] = []
        sources: list[str] = []
        for annos_file, images in ((train_annos, "cars_train"), (test_annos, "cars_test")):
            table = read_mat_annotations(annos_file, ("fname", "class"))
            paths += [folder / images / str(name) for name in table["fname"]]
            class_ids.append(_class_ids(table["class"], annos_file))
            sources += [str(annos_file)] * len(table["fname"])
        return paths, np.concatenate(class_ids), sources

    def read_annotations(self, folder: Path) -> tuple[list[Path], np.ndarray, list[Path], np.ndarray]:
        paths, class_ids, sources = self.read_samples(folder)
        missing = next((i for i, p in enumerate(paths) if not p.is_file()), None)
        if missing is not None:
            self.check_files_exist(paths, sources[missing])
        train = class_ids <= CARS_TRAIN_CLASSES
        return (
            [p for p, t in zip(paths, train) if t], class_ids[train],
            [p for p, t in zip(paths, train) if not t], class_ids[~train],
        )
