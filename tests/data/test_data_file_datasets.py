"""CIFAR-10 and Stanford Online Products on tiny fabricated trees."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robust_ranking.data import CIFAR10DataModule, StanfordOnlineProductsDataModule


def _write_cifar(root: Path, per_batch: int = 20, bytes_keys: bool = True) -> np.ndarray:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    test_data = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [i % 10 for i in range(per_batch)]
        batch = {b"data": data, b"labels": labels} if bytes_keys else {"data": data, "labels": labels}
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f)
        test_data = data
    return test_data


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar10_fabricated_tree(tmp_path, bytes_keys):
    test_data = _write_cifar(tmp_path, bytes_keys=bytes_keys)
    dm = CIFAR10DataModule(
        root=str(tmp_path), download=False, batch_size=20, samples_per_class=2, eval_batch_size=8
    )
    assert dm.num_classes == 10 and dm.image_shape == (3, 32, 32)
    dm.setup()
    assert len(dm.train_set) == 100 and len(dm.eval_set) == 20
    val = next(iter(dm.val_dataloader()))
    assert val.images.shape == (8, 3, 32, 32) and val.images.dtype == torch.float32
    # channel-major layout as in the pickles: R plane first
    expected = torch.from_numpy(test_data[:8].reshape(8, 3, 32, 32)).float() / 255
    assert torch.allclose(val.images, expected)
    train = next(iter(dm.train_dataloader()))
    assert (train.labels.unique(return_counts=True)[1] == 2).all() and len(train.labels.unique()) == 10


def test_cifar10_missing_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CIFAR10DataModule(root=str(tmp_path / "missing"), download=False).setup()

    def failing_download(self, target):
        raise OSError("offline")

    monkeypatch.setattr(CIFAR10DataModule, "_download", failing_download)
    with pytest.raises(FileNotFoundError, match="--data.root.*--data.download=true"):
        CIFAR10DataModule(root=str(tmp_path)).setup()


def _write_sop(root: Path) -> None:
    """3 train classes (ids 1, 2, 5) and 2 test classes (ids 7, 9), images of assorted sizes and modes."""
    rng = np.random.default_rng(0)
    rows = {"train": [(1, 3), (2, 2), (5, 4)], "test": [(7, 3), (9, 2)]}
    image_id = 0
    for split, classes in rows.items():
        lines = ["image_id class_id super_class_id path"]
        for class_id, count in classes:
            folder = root / f"super{class_id % 2}_final"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                image_id += 1
                h, w = (12, 20) if k % 2 else (20, 12)
                mode = "L" if k == 0 else "RGB"
                pixels = rng.integers(0, 256, (h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
                name = f"{class_id}_{k}.png"
                Image.fromarray(pixels, mode=mode).save(folder / name)
                lines.append(f"{image_id} {class_id} {class_id % 2 + 1} {folder.name}/{name}")
        (root / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")


def test_sop_fabricated_tree(tmp_path):
    _write_sop(tmp_path / "Stanford_Online_Products")
    dm = StanfordOnlineProductsDataModule(
        root=str(tmp_path), image_size=8, batch_size=6, samples_per_class=2, eval_batch_size=4, augment=True
    )
    assert dm.image_shape == (3, 8, 8)
    dm.setup()
    assert dm.num_classes == 3 and len(dm.train_set) == 9 and len(dm.eval_set) == 5
    assert dm.train_labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]  # class ids 1, 2, 5 -> 0, 1, 2
    assert dm.eval_labels.tolist() == [0, 0, 0, 1, 1]  # 7, 9 -> 0, 1 within the test split
    batches = list(dm.val_dataloader())
    assert [b.images.shape for b in batches] == [(4, 3, 8, 8), (1, 3, 8, 8)]
    assert torch.equal(torch.cat([b.indices for b in batches]), torch.arange(5))
    images = batches[0].images
    assert images.dtype == torch.float32 and 0.0 <= images.min() and images.max() <= 1.0
    train = next(iter(dm.train_dataloader()))
    assert train.images.shape == (6, 3, 8, 8) and (train.labels.unique(return_counts=True)[1] == 2).all()


def test_sop_train_database_uses_the_eval_transform(tmp_path):
    _write_sop(tmp_path)
    dm = StanfordOnlineProductsDataModule(
        root=str(tmp_path), image_size=8, batch_size=4, samples_per_class=2, augment=True,
        protocol="query_database", database="train", num_queries=2,
    )
    dm.setup()
    assert len(dm.query_set) == 2 and len(dm.database_set) == 9
    first = dm.database_set[0][0]
    assert torch.equal(first, dm.database_set[0][0])  # deterministic: no augmentation
    assert dm.train_set.transform is not dm.database_set.transform


def test_sop_missing_root_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data.root"):
        StanfordOnlineProductsDataModule().setup()
    with pytest.raises(FileNotFoundError, match="Ebay_train.txt"):
        StanfordOnlineProductsDataModule(root=str(tmp_path)).setup()
