"""ResNet-18 (He et al. 2016) from torchvision as an embedding network."""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn


class ResNet18(nn.Module):
    """torchvision's ResNet-18 with its classifier replaced by an embedding layer.

    Args:
        in_channels: image channels (1 for MNIST-like data, 3 for RGB).
        embedding_dim: size of the output embedding.
        small_input: adapt the stem to small images (28x28, 32x32): a 3x3 stride-1 first
            convolution and no max-pooling, the usual CIFAR adaptation; ``False`` keeps the
            ImageNet stem for 224x224 inputs (Stanford Online Products).
        weights_path: optional path of a torchvision ResNet-18 ``state_dict`` to start from
            (nothing is downloaded at run time); the stem and classifier are re-initialised
            where their shapes differ.
    """

    def __init__(
        self,
        in_channels: int = 1,
        embedding_dim: int = 512,
        small_input: bool = True,
        weights_path: str | None = None,
    ) -> None:
        super().__init__()
        net = torchvision.models.resnet18(weights=None)
        if weights_path is not None:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        if small_input:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Linear(net.fc.in_features, embedding_dim)
        self.net = net
        self.embedding_dim = embedding_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
