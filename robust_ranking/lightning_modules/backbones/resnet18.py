"""ResNet-18 as an embedding network (kept for imports of this module; see ``backbones/resnet.py``)."""

from robust_ranking.lightning_modules.backbones.resnet import ResNet18

__all__ = ["ResNet18"]
