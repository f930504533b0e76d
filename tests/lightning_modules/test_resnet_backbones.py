"""ResNet-18 / ResNet-50 backbones with the DML head: shapes, pretrained weights from a local file
(loaded safely, classifier and adapted stem skipped), frozen BatchNorm, BN-neck, ImageNet
normalization inside the ranker, and checkpoints that reload without the weights file."""

from __future__ import annotations

import pytest
import torch
import torchvision
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import TripletMarginLoss
from torch import nn

from robust_ranking.lightning_modules import (
    InputNormalization,
    MetricRanker,
    ResNet18,
    ResNet50,
    UnsafeCheckpointError,
    load_ranker,
)
from run_helpers import REPO

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    """A torchvision ResNet-18 state dict (random 'pretrained' weights) saved as a local file."""
    torch.manual_seed(1)
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


@pytest.mark.parametrize("cls,features", [(ResNet18, 512), (ResNet50, 2048)])
def test_imagenet_stem_shapes_and_dml_head(cls, features):
    torch.manual_seed(0)
    net = cls(in_channels=3, embedding_dim=64, small_input=False).eval()
    assert net.feature_dim == features and net.net.fc.in_features == features and net.net.fc.out_features == 64
    assert isinstance(net.net.maxpool, nn.MaxPool2d) and net.net.conv1.kernel_size == (7, 7)
    with torch.no_grad():
        assert net(torch.rand(2, 3, 64, 64)).shape == (2, 64)


def test_resnet50_defaults_are_rgb_imagenet_stem():
    net = ResNet50()
    assert net.net.conv1.in_channels == 3 and net.net.conv1.kernel_size == (7, 7) and net.embedding_dim == 512


def test_state_dict_keys_unchanged_without_bn_neck():
    """Checkpoints of the CIFAR-stem ResNet-18 (fashion_mnist_ct_resnet18) keep loading."""
    keys = set(ResNet18(in_channels=1, embedding_dim=8).state_dict())
    assert all(k.startswith("net.") for k in keys) and "net.fc.weight" in keys
    neck = ResNet18(in_channels=1, embedding_dim=8, bn_neck=True)
    assert set(neck.state_dict()) - keys == {f"neck.{k}" for k in nn.BatchNorm1d(8).state_dict()}


def test_pretrained_weights_from_a_local_file(resnet18_weights):
    path, state = resnet18_weights
    net = ResNet18(in_channels=3, embedding_dim=32, small_input=False, weights_path=str(path))
    loaded = net.net.state_dict()
    for name, value in state.items():
        if not name.startswith("fc."):
            torch.testing.assert_close(loaded[name], value, msg=name)
    assert loaded["fc.weight"].shape == (32, 512)  # the embedding layer, not the ImageNet classifier
    assert net.pretrained_skipped == []
    # an adapted stem keeps its fresh initialization; the rest is loaded
    small = ResNet18(in_channels=1, embedding_dim=32, small_input=True, weights_path=str(path))
    assert small.pretrained_skipped == ["conv1.weight"]
    torch.testing.assert_close(small.net.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    # a {"state_dict": ...} wrapper is accepted
    wrapped = path.with_name("wrapped.pth")
    torch.save({"state_dict": state}, wrapped)
    torch.testing.assert_close(ResNet18(3, 32, False, str(wrapped)).net.conv1.weight, state["conv1.weight"])


def test_bad_weight_files_are_refused(resnet18_weights, tmp_path):
    path, _ = resnet18_weights
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ResNet18(weights_path=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match=r"rn50.pth is not a torchvision resnet18 state_dict \(198 unexpected"):
        torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "rn50.pth")
        ResNet18(in_channels=3, small_input=False, weights_path=str(tmp_path / "rn50.pth"))
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="'layer2.0.conv1.weight' has shape"):
        ResNet18(in_channels=3, small_input=False, weights_path=str(tmp_path / "shape.pth"))

    class Payload:
        def __reduce__(self):
            return (print, ("ran code",))

    torch.save({"conv1.weight": Payload()}, tmp_path / "payload.pth")
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        ResNet18(weights_path=str(tmp_path / "payload.pth"))


def test_frozen_batchnorm_keeps_running_statistics():
    torch.manual_seed(0)
    net = ResNet18(in_channels=3, embedding_dim=8, small_input=False, freeze_bn=True, bn_neck=True)
    net.train()
    bns = [m for m in net.net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and net.neck.training and net.net.fc.training
    before = [m.running_mean.clone() for m in bns]
    neck_before = net.neck.running_mean.clone()
    out = net(torch.rand(4, 3, 64, 64))
    out.sum().backward()
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))
    assert not torch.equal(neck_before, net.neck.running_mean)  # the BN-neck is not frozen
    assert all(m.weight.grad is not None for m in bns)  # affine parameters still train
    unfrozen = ResNet18(in_channels=3, embedding_dim=8, small_input=False).train()
    assert all(m.training for m in unfrozen.modules() if isinstance(m, nn.BatchNorm2d))


def test_imagenet_normalization_is_inside_the_ranker():
    torch.manual_seed(0)
    backbone = ResNet18(in_channels=3, embedding_dim=16, small_input=False).eval()
    ranker = MetricRanker(backbone, TripletMarginLoss(margin=0.2, distance=CosineSimilarity()),
                          input_normalization=InputNormalization(**IMAGENET)).eval()
    x = torch.rand(2, 3, 64, 64)  # images in [0, 1]
    mean = torch.tensor(IMAGENET["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(backbone((x - mean) / std), dim=-1)
        torch.testing.assert_close(ranker.embed(x), expected)


def test_checkpoint_reloads_without_the_weights_file(resnet18_weights, tmp_path, monkeypatch):
    """The checkpoint's state dict replaces the pretrained start: load_ranker must not need the file."""
    from robust_ranking.cli import train

    path, _ = resnet18_weights
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(path.read_bytes())
    monkeypatch.chdir(tmp_path)
    cli = train.main([
        "fit", "--config", str(REPO / "configs/models/ct_resnet18.yaml"),
        "--data", "robust_ranking.data.SyntheticDataModule", "--data.batch_size", "8", "--data.samples_per_class", "4",
        "--data.eval_batch_size", "64", "--model.init_args.backbone.init_args.embedding_dim", "8",
        "--model.init_args.backbone.init_args.weights_path", str(weights),
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.callbacks", "[]",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_checkpointing", "false",
    ])
    assert cli.model.backbone.pretrained_skipped == ["conv1.weight"]
    ckpt = tmp_path / "model.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    weights.unlink()
    restored = load_ranker(str(ckpt))
    for name, value in cli.model.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[name], value, msg=name)
