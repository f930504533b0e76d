"""Fashion-MNIST (10 clothing classes, 60k train / 10k test, 1x28x28)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from robust_ranking.data.mnist_like_datamodule import MNISTLikeDataModule

# Installed by the Debian/Ubuntu package `dataset-fashion-mnist` (gzipped IDX files).
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


class FashionMNISTDataModule(MNISTLikeDataModule):
    """Fashion-MNIST from ``root``, the Debian package folder, or a torchvision download (in that order).

    See :class:`MNISTLikeDataModule` for the lookup rules and :class:`RetrievalDataModule` for the rest.
    """

    dataset_name: ClassVar[str] = "Fashion-MNIST"
    torchvision_folder: ClassVar[str] = "FashionMNIST"
    install_hint: ClassVar[str] = (
        f"`apt-get install dataset-fashion-mnist` (installs them in {FASHION_MNIST_DEBIAN_DIR})"
    )

    @classmethod
    def debian_dir(cls) -> Path:
        # Read at call time so tests (and unusual installs) can monkeypatch the module constant.
        return Path(FASHION_MNIST_DEBIAN_DIR)
