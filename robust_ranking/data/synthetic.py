"""Small seeded, class-separable image dataset for tests and smoke runs."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from robust_ranking.data.errors import DataConfigError
from robust_ranking.data.retrieval_datamodule import RetrievalDataModule
from robust_ranking.data.tensor_image_dataset import TensorImageDataset


class SyntheticDataModule(RetrievalDataModule):
    """``num_classes`` random per-class templates plus Gaussian pixel noise, clamped to [0, 1].

    Templates mix a coarse (4x4-cell, bilinearly upsampled) pattern -- learnable by MLPs and CNNs alike
    -- with fine per-pixel detail, so a tiny model separates the classes within a few steps. Everything
    is drawn from ``seed``; images are stored as uint8 like the real datasets. Defaults fit the sampler
    (16 = 4 classes x 4 samples).
    """

    def __init__(
        self,
        batch_size: int = 16,
        samples_per_class: int = 4,
        num_queries: int = 16,
        num_classes: int = 4,
        train_per_class: int = 32,
        test_per_class: int = 16,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        noise_std: float = 0.1,
        **kwargs: Any,
    ) -> None:
        # the shared arguments (root, loaders, protocol, ...) are RetrievalDataModule's; jsonargparse
        # follows **kwargs into it, so the CLI still lists them
        super().__init__(batch_size=batch_size, samples_per_class=samples_per_class, num_queries=num_queries, **kwargs)
        if num_classes < 2 or train_per_class < 1 or test_per_class < 1:
            raise DataConfigError(
                f"need num_classes >= 2 and train_per_class, test_per_class >= 1, got {num_classes}, "
                f"{train_per_class}, {test_per_class}"
            )
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise DataConfigError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape}")
        if noise_std < 0:
            raise DataConfigError(f"noise_std must be >= 0, got {noise_std}")
        self.num_classes = num_classes
        self.image_shape = tuple(int(s) for s in image_shape)  # type: ignore[assignment]
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class
        self.noise_std = noise_std

    def load_splits(self) -> tuple[TensorImageDataset, TensorImageDataset]:
        generator = torch.Generator().manual_seed(self.seed)
        k, (c, h, w) = self.num_classes, self.image_shape  # type: ignore[misc]
        coarse = torch.rand(k, c, 4, 4, generator=generator)
        coarse = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        templates = 0.75 * coarse + 0.25 * torch.rand(k, c, h, w, generator=generator)

        def make(per_class: int) -> TensorImageDataset:
            labels = torch.arange(k * per_class) % k  # interleaved: every prefix holds all classes
            noise = torch.randn(labels.numel(), c, h, w, generator=generator) * self.noise_std
            images = (templates[labels] + noise).clamp_(0.0, 1.0)
            return TensorImageDataset(images.mul_(255.0).round_().to(torch.uint8), labels)

        return make(self.train_per_class), make(self.test_per_class)
