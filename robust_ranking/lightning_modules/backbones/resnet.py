"""ResNet-18 / ResNet-50 (He et al. 2016) from torchvision as embedding networks (the DML head)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import Tensor, nn

__all__ = ["ResNet18", "ResNet50", "TorchvisionResNet", "load_pretrained_trunk"]


def load_pretrained_trunk(net: nn.Module, weights_path: str | Path, arch_name: str = "resnet") -> list[str]:
    """Load a torchvision ResNet ``state_dict`` from ``weights_path`` into ``net``'s trunk.

    The file is read with :func:`lightning_modules.load_checkpoint` (``torch.load(weights_only=True)``:
    nothing in it can run code); a ``{"state_dict": ...}`` wrapper is accepted. The ImageNet classifier
    (``fc.*``) is never loaded (``net.fc`` is the embedding layer), nor is the first convolution when
    its shape differs (an adapted stem); every other trunk tensor must be in the file, with its shape.

    Returns the names of the tensors left at their initialization (besides ``fc.*``).

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: not a ``torch.save`` file of tensors.
        ValueError: the file is not a state dict of this architecture (a missing or foreign key).
    """
    from robust_ranking.lightning_modules.checkpoint_io import load_checkpoint

    state = load_checkpoint(weights_path)
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    foreign = sorted(k for k in state if not k.startswith("fc.") and k not in own)
    missing = sorted(k for k in own if k not in state)
    if foreign or missing:
        example = f"unexpected {foreign[0]!r}" if foreign else f"missing {missing[0]!r}"
        raise ValueError(
            f"{weights_path} is not a torchvision {arch_name} state_dict "
            f"({len(foreign)} unexpected and {len(missing)} missing keys, e.g. {example})"
        )
    mismatched = sorted(k for k in own if not isinstance(state[k], Tensor) or state[k].shape != own[k].shape)
    wrong = [k for k in mismatched if k != "conv1.weight"]
    if wrong:
        raise ValueError(
            f"{weights_path} is not a torchvision {arch_name} state_dict ({wrong[0]!r} has shape "
            f"{tuple(getattr(state[wrong[0]], 'shape', ()))}, the backbone needs {tuple(own[wrong[0]].shape)})"
        )
    skipped = mismatched
    net.load_state_dict({k: state[k] for k in own if k not in skipped}, strict=False)
    return skipped


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet trunk with the deep-metric-learning head: global average pooling ->
    ``Linear(features, embedding_dim)`` (the ``fc`` layer) -> optional BN-neck (``BatchNorm1d``).

    Args:
        arch: the torchvision constructor (``torchvision.models.resnet18`` ...), built with
            ``weights=None`` (nothing is downloaded).
        in_channels: image channels (1 for MNIST-like data, 3 for RGB).
        embedding_dim: size of the output embedding.
        small_input: adapt the stem to small images (28x28, 32x32): a 3x3 stride-1 first
            convolution and no max-pooling, the usual CIFAR adaptation; ``False`` keeps the
            ImageNet stem for 224x224 inputs (CUB, Cars196, SOP).
        weights_path: optional local file holding a torchvision ``state_dict`` of the same
            architecture (e.g. ImageNet weights saved once with ``torch.save(model.state_dict(), path)``),
            loaded safely (:func:`load_pretrained_trunk`); the classifier and any tensor whose shape
            differs (an adapted stem) keep their fresh initialization.
        bn_neck: a ``BatchNorm1d`` after the embedding layer (the BN-neck of re-identification / DML
            baselines).
        freeze_bn: keep the trunk's BatchNorm layers in eval mode while training (running statistics
            stay those of the pretrained weights; their affine parameters still train), as the
            RobRank 224x224 models do. The BN-neck is not frozen.
        channels_last: keep the trunk's weights and its input images in the ``channels_last``
            (NHWC) memory format, the fast layout of cuDNN / tensor-core convolutions under mixed
            precision (``--trainer.precision bf16-mixed`` / ``16-mixed``); the numbers are those of
            the default layout up to float rounding (tests/lightning_modules/test_mixed_precision.py).
            Only the layout changes: images stay ``[B, C, H, W]`` in ``[0, 1]`` and the state dict's
            keys and shapes are the same, so checkpoints load either way.

    Normalization (ImageNet mean / std for pretrained weights) belongs to the ranker
    (``MetricRanker(input_normalization=...)``), so images and attack budgets stay in [0, 1].
    """

    def __init__(
        self,
        arch: Callable[..., torchvision.models.ResNet],
        in_channels: int = 3,
        embedding_dim: int = 512,
        small_input: bool = False,
        weights_path: str | None = None,
        bn_neck: bool = False,
        freeze_bn: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        net = arch(weights=None)
        if small_input:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.feature_dim = net.fc.in_features
        net.fc = nn.Linear(self.feature_dim, embedding_dim)
        self.net = net
        # Only with bn_neck: models without it keep the state-dict keys of earlier releases.
        self.neck = nn.BatchNorm1d(embedding_dim) if bn_neck else None
        self.embedding_dim = embedding_dim
        self.freeze_bn = freeze_bn
        self.pretrained_skipped: list[str] = []
        if weights_path is not None:
            self.pretrained_skipped = load_pretrained_trunk(net, weights_path, arch.__name__)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            # (load_state_dict copies into the existing tensors, so the layout survives checkpoint loads)
            self.net.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> "TorchvisionResNet":
        super().train(mode)
        if self.freeze_bn and mode:
            for module in self.net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        z = self.net(x)
        return self.neck(z) if self.neck is not None else z


class ResNet18(TorchvisionResNet):
    """torchvision's ResNet-18 with the DML head (:class:`TorchvisionResNet`); 512 trunk features.

    The defaults (1 channel, CIFAR stem) fit MNIST-like data; for 224x224 RGB benchmarks use
    ``in_channels=3, small_input=False`` (``configs/models/ct_rn18_dml.yaml``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        embedding_dim: int = 512,
        small_input: bool = True,
        weights_path: str | None = None,
        bn_neck: bool = False,
        freeze_bn: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(torchvision.models.resnet18, in_channels, embedding_dim, small_input, weights_path,
                         bn_neck, freeze_bn, channels_last)


class ResNet50(TorchvisionResNet):
    """torchvision's ResNet-50 with the DML head (:class:`TorchvisionResNet`); 2048 trunk features,
    ImageNet stem and RGB input by default."""

    def __init__(
        self,
        in_channels: int = 3,
        embedding_dim: int = 512,
        small_input: bool = False,
        weights_path: str | None = None,
        bn_neck: bool = False,
        freeze_bn: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(torchvision.models.resnet50, in_channels, embedding_dim, small_input, weights_path,
                         bn_neck, freeze_bn, channels_last)
