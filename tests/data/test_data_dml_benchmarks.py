"""CUB-200-2011, Cars196 and Stanford Online Products on tiny fabricated trees in their official
layouts (JPEGs written with PIL): the DML zero-shot split, the standard transforms, class-balanced
batches, and one-line errors naming the file for a missing root / image or a corrupt image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision import transforms

from robust_ranking.data import (
    Cars196DataModule,
    CUB200DataModule,
    DataConfigError,
    DataNotFoundError,
    StanfordOnlineProductsDataModule,
)
from run_helpers import DML_CLASSES, fabricate_dml_tree

MODULES = {"cub": CUB200DataModule, "cars": Cars196DataModule, "sop": StanfordOnlineProductsDataModule}
CASES = [("cub", "annos"), ("cars", "annos"), ("cars", "devkit"), ("sop", "annos")]
PER_CLASS = 4


def make(kind: str, root: Path, **kwargs):
    args = {"root": str(root), "batch_size": 4, "samples_per_class": 2, "eval_batch_size": 5, **kwargs}
    return MODULES[kind](**args)


@pytest.mark.parametrize("kind,layout", CASES, ids=[f"{k}-{lay}" for k, lay in CASES])
def test_official_layout_gives_the_dml_split(kind, layout, tmp_path):
    paths = fabricate_dml_tree(kind, tmp_path, per_class=PER_CLASS, layout=layout)
    dm = make(kind, tmp_path)
    assert dm.image_shape == (3, 224, 224)
    dm.setup()
    n_train, n_test = (len(c) * PER_CLASS for c in DML_CLASSES[kind])
    assert len(dm.train_set) == n_train and len(dm.eval_set) == n_test
    assert dm.num_classes == 3
    # classes 1..100 / 1..98 / 1..11318 train, the rest test; ids remapped to 0..C-1 within each split
    assert sorted(dm.train_labels.tolist()) == sorted([0, 1, 2] * PER_CLASS)
    assert sorted(dm.eval_labels.tolist()) == sorted([0, 1, 2] * PER_CLASS)
    assert {p.resolve() for p in dm.train_set.paths + dm.eval_set.paths} == {p.resolve() for p in paths}
    train_names = {p.name for p in dm.train_set.paths}
    test_names = {p.name for p in dm.eval_set.paths}
    assert not train_names & test_names

    batches = list(dm.val_dataloader())
    assert [tuple(b.images.shape) for b in batches] == [(5, 3, 224, 224)] * 2 + [(2, 3, 224, 224)]
    assert torch.equal(torch.cat([b.indices for b in batches]), torch.arange(n_test))
    images = batches[0].images
    assert images.dtype == torch.float32 and 0.0 <= images.min() and images.max() <= 1.0  # no normalization
    train = next(iter(dm.train_dataloader()))
    assert train.images.shape == (4, 3, 224, 224)
    assert (train.labels.unique(return_counts=True)[1] == 2).all()  # class-balanced: 2 classes x 2


def test_root_may_be_the_dataset_folder_or_its_parent(tmp_path):
    fabricate_dml_tree("cub", tmp_path)
    a, b = make("cub", tmp_path), make("cub", tmp_path / "CUB_200_2011")
    a.setup()
    b.setup()
    assert a.train_set.paths == b.train_set.paths


def test_standard_dml_transforms(tmp_path):
    dm = CUB200DataModule(root=str(tmp_path))
    train, test = dm.train_transform().transforms, dm.eval_transform().transforms
    assert isinstance(train[0], transforms.RandomResizedCrop) and train[0].size == (224, 224)
    assert isinstance(train[1], transforms.RandomHorizontalFlip)
    assert isinstance(test[0], transforms.Resize) and test[0].size == 256
    assert isinstance(test[1], transforms.CenterCrop) and test[1].size == (224, 224)
    assert [type(t) for t in dm.train_transform().transforms][-1] is transforms.ToTensor  # [0, 1], no Normalize
    assert not any(isinstance(t, transforms.Normalize) for t in train + test)
    no_aug = CUB200DataModule(root=str(tmp_path), augment=False)
    assert [type(t) for t in no_aug.train_transform().transforms] == [type(t) for t in test]
    small = CUB200DataModule(image_size=64)
    assert small.resize_size == 73 and small.image_shape == (3, 64, 64)
    with pytest.raises(DataConfigError, match="resize_size"):
        CUB200DataModule(image_size=64, resize_size=32)


def test_train_database_is_served_without_augmentation(tmp_path):
    fabricate_dml_tree("cars", tmp_path)
    dm = make("cars", tmp_path, protocol="query_database", database="train", num_queries=3, image_size=32)
    dm.setup()
    assert len(dm.query_set) == 3 and len(dm.database_set) == len(dm.train_set)
    assert torch.equal(dm.database_set[0][0], dm.database_set[0][0])  # deterministic
    assert dm.train_set.transform is not dm.database_set.transform


@pytest.mark.parametrize("kind", list(MODULES))
def test_missing_root_is_one_line_naming_it(kind, tmp_path):
    with pytest.raises(DataNotFoundError, match="--data.root") as info:
        MODULES[kind]().setup()
    assert "\n" not in str(info.value)
    with pytest.raises(DataNotFoundError, match="is not a folder"):
        MODULES[kind](root=str(tmp_path / "nowhere")).setup()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)) as info:  # a folder without the annotations
        MODULES[kind](root=str(tmp_path)).setup()
    assert isinstance(info.value, DataConfigError) and "\n" not in str(info.value)


@pytest.mark.parametrize("kind,layout", CASES, ids=[f"{k}-{lay}" for k, lay in CASES])
def test_missing_image_names_the_file(kind, layout, tmp_path):
    paths = fabricate_dml_tree(kind, tmp_path, layout=layout)
    paths[5].unlink()
    paths[7].unlink()
    with pytest.raises(DataNotFoundError, match="and 1 more") as info:
        make(kind, tmp_path).setup()
    message = str(info.value)
    assert str(paths[5]) in message and "\n" not in message


@pytest.mark.parametrize("kind", list(MODULES))
@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_corrupt_image_names_the_file(kind, damage, tmp_path):
    paths = fabricate_dml_tree(kind, tmp_path)
    bad = paths[0]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"<html>404</html>")
    dm = make(kind, tmp_path, augment=False)
    dm.setup()  # only decoding finds it
    index = next(i for i, p in enumerate(dm.train_set.paths) if p == bad)
    with pytest.raises(DataConfigError, match="cannot be decoded") as info:
        dm.train_set[index]
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_bad_annotation_files_are_one_line_errors(tmp_path):
    fabricate_dml_tree("cub", tmp_path)
    labels = tmp_path / "CUB_200_2011" / "image_class_labels.txt"
    labels.write_text("\n".join(labels.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(DataConfigError, match="different image ids"):
        make("cub", tmp_path).setup()
    labels.write_text("1 2 3\nnonsense\n")
    with pytest.raises(DataConfigError, match=r"image_class_labels.txt, line 2"):
        make("cub", tmp_path).setup()

    fabricate_dml_tree("cars", tmp_path / "cars")
    (tmp_path / "cars" / "cars_annos.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataConfigError, match="cars_annos.mat cannot be read"):
        make("cars", tmp_path / "cars").setup()

    fabricate_dml_tree("cars", tmp_path / "devkit", layout="devkit")
    (tmp_path / "devkit" / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DataNotFoundError, match="cars_test_annos_withlabels.mat"):
        make("cars", tmp_path / "devkit").setup()


def test_cli_reports_a_missing_image_in_one_line(tmp_path, monkeypatch, capsys):
    from robust_ranking.cli import train
    from run_helpers import REPO

    paths = fabricate_dml_tree("sop", tmp_path / "data")
    paths[-1].unlink()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        train.main(["fit", "--config", str(REPO / "configs/sop_rn18_ct.yaml"), "--data.root", str(tmp_path / "data"),
                    "--data.num_workers", "0", "--trainer.fast_dev_run", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train.py: error: image ") and str(paths[-1]) in err[-1]
