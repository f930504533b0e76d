"""The rankers (LightningModules) and their parts."""

from lightning_modules.backbones import C2F1, LeNet, ResNet18
from lightning_modules.input_normalization import InputNormalization
from lightning_modules.metric_ranker import MetricRanker
from lightning_modules.ranker import Ranker

__all__ = ["C2F1", "InputNormalization", "LeNet", "MetricRanker", "Ranker", "ResNet18"]
