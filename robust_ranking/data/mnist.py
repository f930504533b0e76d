"""MNIST (10 digit classes, 60k train / 10k test, 1x28x28)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from robust_ranking.data.mnist_like_datamodule import MNISTLikeDataModule

# Mirrors the Fashion-MNIST package's layout. Debian (bookworm) ships no MNIST package, so this folder
# exists only if an administrator copied the IDX files there.
MNIST_DEBIAN_DIR = "/usr/share/datasets/mnist"


class MNISTDataModule(MNISTLikeDataModule):
    """MNIST from ``root``, :data:`MNIST_DEBIAN_DIR`, or a torchvision download (in that order).

    See :class:`MNISTLikeDataModule` for the lookup rules and :class:`RetrievalDataModule` for the rest.
    """

    dataset_name: ClassVar[str] = "MNIST"
    torchvision_folder: ClassVar[str] = "MNIST"
    install_hint: ClassVar[str] = (
        f"copy the IDX files into {MNIST_DEBIAN_DIR} (no Debian package ships MNIST)"
    )

    @classmethod
    def debian_dir(cls) -> Path:
        # Read at call time so tests (and unusual installs) can monkeypatch the module constant.
        return Path(MNIST_DEBIAN_DIR)
