"""Shared logic of the 28x28 grey-scale IDX datasets (MNIST, Fashion-MNIST): locate, download, load."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from robust_ranking.data.errors import DataConfigError
from robust_ranking.data.idx_format import read_idx_ubyte
from robust_ranking.data.retrieval_datamodule import RetrievalDataModule
from robust_ranking.data.tensor_image_dataset import TensorImageDataset

# Where torchvision downloads go when no root is given (relative to the working directory).
DEFAULT_DOWNLOAD_ROOT = "./datasets"

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class MNISTLikeDataModule(RetrievalDataModule):
    """Base of :class:`MNISTDataModule` / :class:`FashionMNISTDataModule`.

    The four IDX files (gzipped or not; ``train-images-idx3-ubyte`` or ``train-images.idx3-ubyte``
    spelling) are looked for, in order:

    1. in ``root`` (flat, or torchvision's ``<root>/<Folder>/raw`` layout) when given;
    2. in the Debian package's folder (:meth:`debian_dir`);
    3. else torchvision downloads them into ``root`` (``./datasets`` when None) if ``download``.

    An explicit ``root`` that does not exist is an error when ``download`` is False (likely a typo).
    Images are held in memory as uint8 ``[N, 1, 28, 28]`` and converted to float per batch.
    """

    num_classes: int | None = 10
    image_shape: tuple[int, int, int] | None = (1, 28, 28)

    dataset_name: ClassVar[str] = ""
    torchvision_folder: ClassVar[str] = ""  # torchvision's class name, also its folder under root
    install_hint: ClassVar[str] = ""  # how to get the files system-wide (Debian package, ...)

    def __init__(
        self,
        download: bool = True,
        **kwargs: Any,
    ) -> None:
        # the shared arguments (root, loaders, protocol, ...) are RetrievalDataModule's; jsonargparse
        # follows **kwargs into it, so the CLI still lists them
        super().__init__(**kwargs)
        self.download = download

    @classmethod
    def debian_dir(cls) -> Path:
        """Folder where the distribution package puts the IDX files."""
        raise NotImplementedError

    @classmethod
    def find_idx_files(cls, directory: Path) -> dict[str, Path] | None:
        """The four IDX files in ``directory`` (flat or torchvision layout), or None if any is missing."""
        tv_folder = directory / cls.torchvision_folder
        for folder in (directory, tv_folder / "raw", tv_folder):
            found: dict[str, Path] = {}
            for key, stem in _IDX_FILES.items():
                dotted = stem.replace("-idx", ".idx")  # e.g. Kaggle's "train-images.idx3-ubyte"
                for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
                    if (folder / name).is_file():
                        found[key] = folder / name
                        break
            if len(found) == len(_IDX_FILES):
                return found
        return None

    def _download(self, target: Path) -> None:
        """Let torchvision download both splits into ``target`` (needs internet)."""
        import torchvision.datasets

        dataset_cls = getattr(torchvision.datasets, self.torchvision_folder)
        for train in (True, False):
            dataset_cls(root=str(target), train=train, download=True)

    def resolve_files(self) -> dict[str, Path]:
        """Locate (or download) the IDX files; one FileNotFoundError naming every way to get them."""
        root = Path(self.root).expanduser() if self.root is not None else None
        if root is not None:
            if root.is_dir():
                if (found := self.find_idx_files(root)) is not None:
                    return found
            elif not self.download:
                raise FileNotFoundError(
                    f"--data.root {root} does not exist: point it at the folder holding the "
                    f"{self.dataset_name} IDX files, or set --data.download=true to download them there"
                )
        debian = self.debian_dir()
        # A --data.root that does not exist is either a typo or a download target: never
        # silently swap in the Debian copy for it.
        root_missing = root is not None and not root.is_dir()
        if not root_missing and debian.is_dir() and (found := self.find_idx_files(debian)) is not None:
            return found

        target = root if root is not None else Path(DEFAULT_DOWNLOAD_ROOT)
        if self.download:
            try:
                self._download(target)
            except Exception as err:  # noqa: BLE001 - any failure (no network, bad checksum) is reported
                reason = " ".join(str(err).split())  # keep the message on one line
                download_status = f"download into {target} failed ({type(err).__name__}: {reason})"
            else:
                if (found := self.find_idx_files(target)) is not None:
                    return found
                download_status = f"download into {target} finished but the files are not there"
        else:
            download_status = "download is disabled (--data.download=false)"
        looked = f"{root}, {debian}" if root is not None else f"{debian} (no --data.root given)"
        raise FileNotFoundError(
            f"{self.dataset_name} IDX files not found (looked in {looked}; {download_status}). Get them one "
            f"of three ways: (1) pass --data.root pointing at a folder with the 4 IDX files (flat, or "
            f"torchvision's <root>/{self.torchvision_folder}/raw); (2) {self.install_hint}; (3) allow "
            f"torchvision to download them (--data.download=true, needs internet) "
            f"into --data.root or {DEFAULT_DOWNLOAD_ROOT}"
        )

    def prepare_data(self) -> None:
        """Download if needed; Lightning runs this on one process per node, before ``setup``."""
        self.resolve_files()

    def load_splits(self) -> tuple[TensorImageDataset, TensorImageDataset]:
        files = self.resolve_files()

        def load(split: str) -> TensorImageDataset:
            images = read_idx_ubyte(files[f"{split}_images"])
            labels = read_idx_ubyte(files[f"{split}_labels"])
            if images.ndim != 3 or labels.shape != images.shape[:1]:
                raise DataConfigError(
                    f"{files[f'{split}_images']}: expected [N, H, W] images with N labels, got "
                    f"{images.shape} and {labels.shape}; re-download the files"
                )
            # np.array copies the read-only buffer so torch gets a writable, owned array.
            return TensorImageDataset(
                torch.from_numpy(np.array(images)), torch.from_numpy(labels.astype(np.int64))
            )

        return load("train"), load("test")
