"""LeNet (LeCun et al. 1998, Caffe variant) as an embedding network; ECCV 2020 Table 5."""

from __future__ import annotations

from torch import Tensor, nn


class LeNet(nn.Module):
    """conv 5x5 20 -> pool -> conv 5x5 50 -> pool -> fc 500 -> ReLU -> fc embedding.

    Args:
        in_channels: image channels.
        embedding_dim: size of the output embedding (replaces the 10-way classifier).
        image_size: input height = width (28 for MNIST-like data, 32 for CIFAR-10).
    """

    def __init__(self, in_channels: int = 1, embedding_dim: int = 128, image_size: int = 28) -> None:
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"LeNet needs images of at least 16x16, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, kernel_size=5),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, kernel_size=5),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(50 * side * side, 500),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(500, embedding_dim)
        self.embedding_dim = embedding_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))
