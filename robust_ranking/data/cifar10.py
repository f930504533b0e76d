"""CIFAR-10 (10 classes, 50k train / 10k test, 3x32x32) from torchvision's python-pickle batches."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robust_ranking.data.errors import DataConfigError
from robust_ranking.data.mnist_like_datamodule import DEFAULT_DOWNLOAD_ROOT
from robust_ranking.data.retrieval_datamodule import RetrievalDataModule
from robust_ranking.data.tensor_image_dataset import TensorImageDataset

CIFAR10_FOLDER = "cifar-10-batches-py"
_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
_TEST_BATCHES = ["test_batch"]


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle that names something other than what numpy arrays need."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles ``bytes`` at protocol 2, for latin-1 only."""
    if encoding not in ("latin1", "latin-1"):
        raise _RefusedGlobal(f"it asks for the codec {encoding!r}, not latin1")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """What a pickle of a dict of numpy arrays, lists, ints and bytes names (any numpy version,
    any protocol): the array and dtype classes and numpy's array rebuilders."""
    from numpy._core import multiarray, numeric

    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           ("_codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR batches that refuses every class or function but the few numpy needs
    to rebuild arrays (nothing named in the file is imported or called otherwise)."""

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed_globals().get((module, name))
        if found is None:
            raise _RefusedGlobal(f"it names {module}.{name}, which loading would have to import or call")
        return found


def _read_pickle_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 [N, 3, 32, 32], int64 [N])`` from one pickled batch (keys may be bytes or str)."""
    with path.open("rb") as f:
        # The official files are pickled dicts of numpy arrays: nothing else is unpickled.
        try:
            batch: dict[Any, Any] = _ArrayUnpickler(f, encoding="bytes").load()
        except _RefusedGlobal as err:
            raise DataConfigError(f"{path} is refused: not a plain CIFAR batch ({err}); re-download it") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            raise DataConfigError(f"{path}: truncated or corrupt CIFAR batch ({reason}); re-download it") from None
    if not isinstance(batch, dict):
        raise DataConfigError(f"{path} is not a CIFAR python batch (not a dict); re-download it")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or not ({"labels", "fine_labels"} & batch.keys()):
        raise DataConfigError(f"{path} is not a CIFAR python batch (no 'data'/'labels'); re-download it")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != data.shape[:1]:
        raise DataConfigError(f"{path}: expected data [N, 3072] and N labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


class CIFAR10DataModule(RetrievalDataModule):
    """CIFAR-10 held in memory as uint8 ``[N, 3, 32, 32]``.

    Looks for ``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``) in ``root`` (or ``root``
    being that folder itself); otherwise torchvision downloads it into ``root`` (``./datasets`` when None)
    if ``download``. An explicit ``root`` that does not exist is an error when ``download`` is False.
    """

    num_classes: int | None = 10
    image_shape: tuple[int, int, int] | None = (3, 32, 32)

    def __init__(
        self,
        download: bool = True,
        **kwargs: Any,
    ) -> None:
        # the shared arguments (root, loaders, protocol, ...) are RetrievalDataModule's; jsonargparse
        # follows **kwargs into it, so the CLI still lists them
        super().__init__(**kwargs)
        self.download = download

    @staticmethod
    def find_batches(directory: Path) -> Path | None:
        """The folder holding the pickled batches under ``directory``, or None."""
        for folder in (directory / CIFAR10_FOLDER, directory):
            if all((folder / name).is_file() for name in _TRAIN_BATCHES + _TEST_BATCHES):
                return folder
        return None

    def _download(self, target: Path) -> None:
        """Let torchvision download and extract the archive into ``target`` (needs internet)."""
        import torchvision.datasets

        torchvision.datasets.CIFAR10(root=str(target), train=True, download=True)

    def resolve_folder(self) -> Path:
        """Locate (or download) the batches folder; a FileNotFoundError naming both ways to get it."""
        root = Path(self.root).expanduser() if self.root is not None else None
        if root is not None:
            if root.is_dir():
                if (found := self.find_batches(root)) is not None:
                    return found
            elif not self.download:
                raise FileNotFoundError(
                    f"--data.root {root} does not exist: point it at the folder holding {CIFAR10_FOLDER}, "
                    "or set --data.download=true to download it there"
                )
        target = root if root is not None else Path(DEFAULT_DOWNLOAD_ROOT)
        if self.download:
            try:
                self._download(target)
            except Exception as err:  # noqa: BLE001 - any failure ends up in the message
                reason = " ".join(str(err).split())  # keep the message on one line
                status = f"download into {target} failed ({type(err).__name__}: {reason})"
            else:
                if (found := self.find_batches(target)) is not None:
                    return found
                status = f"download into {target} finished but {CIFAR10_FOLDER} is not there"
        else:
            status = "download is disabled (--data.download=false)"
        raise FileNotFoundError(
            f"CIFAR-10 not found (looked in {root if root is not None else '(no --data.root given)'}; "
            f"{status}). Either pass --data.root pointing at a folder containing {CIFAR10_FOLDER}/, or allow "
            f"torchvision to download it (--data.download=true, needs internet) "
            f"into --data.root or {DEFAULT_DOWNLOAD_ROOT}"
        )

    def prepare_data(self) -> None:
        """Download if needed; Lightning runs this on one process per node, before ``setup``."""
        self.resolve_folder()

    def load_splits(self) -> tuple[TensorImageDataset, TensorImageDataset]:
        folder = self.resolve_folder()

        def load(names: list[str]) -> TensorImageDataset:
            parts = [_read_pickle_batch(folder / name) for name in names]
            images = np.concatenate([p[0] for p in parts])
            labels = np.concatenate([p[1] for p in parts])
            return TensorImageDataset(torch.from_numpy(images), torch.from_numpy(labels))

        return load(_TRAIN_BATCHES), load(_TEST_BATCHES)
