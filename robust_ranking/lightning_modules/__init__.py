"""The rankers (LightningModules) and their parts."""

from robust_ranking.lightning_modules.backbones import C2F1, LeNet, ResNet18, ResNet50
from robust_ranking.lightning_modules.capabilities import HashingRanker, ProductQuantizationRanker, TrainingLossRanker
from robust_ranking.lightning_modules.checkpoint_io import UnsafeCheckpointError, load_checkpoint, ranker_from_checkpoint
from robust_ranking.lightning_modules.input_normalization import InputNormalization
from robust_ranking.lightning_modules.metric_ranker import MetricRanker
from robust_ranking.lightning_modules.ranker import Ranker, load_ranker

__all__ = ["C2F1", "HashingRanker", "InputNormalization", "LeNet", "MetricRanker", "ProductQuantizationRanker",
           "Ranker", "ResNet18", "ResNet50", "TrainingLossRanker", "UnsafeCheckpointError", "load_checkpoint", "load_ranker",
           "ranker_from_checkpoint"]

# Deep Cauchy Hashing (docs/dch.md)
from robust_ranking.lightning_modules.dch_loss import DCHLoss  # noqa: E402
from robust_ranking.lightning_modules.dch_ranker import DCHRanker  # noqa: E402

__all__ += ["DCHLoss", "DCHRanker"]

# Deep product quantization and k-means PQ (docs/dpqn.md)
from robust_ranking.lightning_modules.dpqn_ranker import DPQNRanker  # noqa: E402
from robust_ranking.lightning_modules.kmeans_pq_ranker import KMeansPQRanker  # noqa: E402
from robust_ranking.lightning_modules.soft_product_quantizer import SoftProductQuantizer  # noqa: E402

__all__ += ["DPQNRanker", "KMeansPQRanker", "SoftProductQuantizer"]
