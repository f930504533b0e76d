"""Backbone networks: images in, feature vectors out."""

from robust_ranking.lightning_modules.backbones.c2f1 import C2F1
from robust_ranking.lightning_modules.backbones.lenet import LeNet
from robust_ranking.lightning_modules.backbones.resnet18 import ResNet18

__all__ = ["C2F1", "LeNet", "ResNet18"]
