"""Backbone networks: images in, feature vectors out."""

from robust_ranking.lightning_modules.backbones.c2f1 import C2F1
from robust_ranking.lightning_modules.backbones.lenet import LeNet
from robust_ranking.lightning_modules.backbones.resnet import ResNet18, ResNet50, TorchvisionResNet

__all__ = ["C2F1", "LeNet", "ResNet18", "ResNet50", "TorchvisionResNet"]
