"""C2F1: the two-conv, one-FC network of ECCV 2020 (Sec. 4.1) for 28x28 inputs."""

from __future__ import annotations

from torch import Tensor, nn


class C2F1(nn.Module):
    """conv 5x5 32 -> pool -> conv 5x5 64 -> pool -> fc.

    The network of Madry et al. (2018) without its last (classification) layer, as in
    ECCV 2020 Sec. 4.1; the fc output (1024-d by default) is the embedding.

    Args:
        in_channels: image channels (1 for MNIST / Fashion-MNIST).
        embedding_dim: width of the final fc layer, i.e. the embedding size.
        image_size: input height = width; must be divisible by 4.
    """

    def __init__(self, in_channels: int = 1, embedding_dim: int = 1024, image_size: int = 28) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"C2F1 needs an image size divisible by 4, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.fc = nn.Linear(64 * (image_size // 4) ** 2, embedding_dim)
        self.embedding_dim = embedding_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))
