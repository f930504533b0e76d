"""Fashion-MNIST / MNIST: the Debian files, fabricated IDX trees, and the not-found errors."""

from pathlib import Path

import numpy as np
import pytest
import torch

from robust_ranking import data
import robust_ranking.data.fashion_mnist  # noqa: F401
import robust_ranking.data.mnist  # noqa: F401
from robust_ranking.data import FashionMNISTDataModule, MNISTDataModule, read_idx_ubyte, write_idx_ubyte

DEBIAN = Path(data.fashion_mnist.FASHION_MNIST_DEBIAN_DIR)
needs_debian = pytest.mark.skipif(
    FashionMNISTDataModule.find_idx_files(DEBIAN) is None,
    reason="Debian package dataset-fashion-mnist not installed",
)


@pytest.fixture(scope="module")
def fashion() -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(download=False)
    dm.setup()
    return dm


def _write_tree(
    folder: Path, n_train: int = 40, n_test: int = 20, gz: bool = True, dotted: bool = False
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        sep = "." if dotted else "-"
        write_idx_ubyte(folder / f"{split}-images{sep}idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)))
        write_idx_ubyte(folder / f"{split}-labels{sep}idx1-ubyte{suffix}", np.arange(n) % 10)


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    empty = tmp_path / "debian-empty"
    empty.mkdir()
    monkeypatch.setattr(data.fashion_mnist, "FASHION_MNIST_DEBIAN_DIR", str(empty))
    monkeypatch.setattr(data.mnist, "MNIST_DEBIAN_DIR", str(empty))
    return empty


@needs_debian
@pytest.mark.slow
def test_fashion_mnist_from_debian_path(fashion):
    assert len(fashion.train_set) == 60000 and len(fashion.eval_set) == 10000
    assert fashion.num_classes == 10 and fashion.image_shape == (1, 28, 28)
    assert fashion.train_set.images.dtype == torch.uint8
    assert set(fashion.train_labels.unique().tolist()) == set(range(10))
    assert set(fashion.eval_labels.unique().tolist()) == set(range(10))
    val = next(iter(fashion.val_dataloader()))
    assert val.images.shape == (500, 1, 28, 28) and val.images.dtype == torch.float32
    assert 0.0 <= val.images.min() and val.images.max() <= 1.0 and val.images.max() > 0.9
    assert torch.equal(val.indices, torch.arange(500))


@needs_debian
@pytest.mark.slow
def test_fashion_mnist_first_train_batch_is_balanced(fashion):
    loader = fashion.train_dataloader()
    assert len(loader) == 60000 // 64
    images, labels, indices = next(iter(loader))
    assert images.shape == (64, 1, 28, 28)
    _, counts = labels.unique(return_counts=True)
    assert len(counts) == 8 and (counts == 8).all()
    assert torch.equal(fashion.train_labels[indices], labels)


def test_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        write_idx_ubyte(tmp_path / name, array)
        assert np.array_equal(read_idx_ubyte(tmp_path / name), array)
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx_ubyte(tmp_path / "bad")


@pytest.mark.parametrize("layout", ["flat-gz", "torchvision-raw", "dotted"])
def test_mnist_from_fabricated_root(tmp_path, no_debian, layout):
    if layout == "torchvision-raw":
        _write_tree(tmp_path / "MNIST" / "raw", gz=False)
    else:
        _write_tree(tmp_path, dotted=layout == "dotted")
    dm = MNISTDataModule(root=str(tmp_path), download=False, batch_size=20, samples_per_class=2)
    dm.setup()
    assert len(dm.train_set) == 40 and len(dm.eval_set) == 20
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape == (20, 1, 28, 28)
    assert (batch.labels.unique(return_counts=True)[1] == 2).all()


def test_root_without_files_falls_back_to_debian_path(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    _write_tree(debian)
    monkeypatch.setattr(data.fashion_mnist, "FASHION_MNIST_DEBIAN_DIR", str(debian))
    (tmp_path / "empty").mkdir()
    dm = FashionMNISTDataModule(root=str(tmp_path / "empty"), download=False)
    assert dm.resolve_files()["train_images"].parent == debian


@pytest.mark.parametrize("root_kind", ["none", "empty"])
def test_missing_dataset_error_names_all_three_ways(tmp_path, monkeypatch, no_debian, root_kind):
    attempts = []

    def failing_download(self, target):
        attempts.append(target)
        raise OSError("no internet\nhere")

    monkeypatch.setattr(FashionMNISTDataModule, "_download", failing_download)
    monkeypatch.chdir(tmp_path)  # the root=None download target ./datasets lands in the temp dir
    root = None
    if root_kind == "empty":
        root = tmp_path / "empty"
        root.mkdir()
    dm = FashionMNISTDataModule(root=None if root is None else str(root))
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    message = str(info.value)
    assert "\n" not in message
    assert "--data.root" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data.download=true" in message and "no internet" in message
    assert str(no_debian) in message
    assert attempts == [root if root is not None else Path("./datasets")]


def test_missing_mnist_error_tells_where_to_copy_the_files(tmp_path, no_debian):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="download is disabled") as info:
        MNISTDataModule(root=str(tmp_path / "empty"), download=False).setup()
    assert "--data.root" in str(info.value) and "copy the IDX files into" in str(info.value)


def test_explicit_nonexistent_root_without_download_names_the_path(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        FashionMNISTDataModule(root=str(missing), download=False).setup()
    assert str(missing) in str(info.value) and "\n" not in str(info.value)


def test_explicit_nonexistent_root_with_download_tries_downloading_there(tmp_path, monkeypatch, no_debian):
    missing = tmp_path / "new"
    def fake_download(self, target):
        _write_tree(target / "FashionMNIST" / "raw")

    monkeypatch.setattr(FashionMNISTDataModule, "_download", fake_download)
    dm = FashionMNISTDataModule(root=str(missing))
    dm.setup()
    assert len(dm.train_set) == 40 and (missing / "FashionMNIST" / "raw").is_dir()
