"""Lightning callbacks: in-loop adversarial training, robustness evaluation, embedding projector, warm start."""

from robust_ranking.callbacks.embedding_projector import EmbeddingProjector
from robust_ranking.callbacks.max_shift_adversarial_training import MaxShiftAdversarialTraining
from robust_ranking.callbacks.robustness_evaluation import RobustnessEvaluation
from robust_ranking.callbacks.triplet_adversarial_training import (
    AntiCollapseTripletTraining,
    HardnessManipulationTraining,
)
from robust_ranking.callbacks.warm_start import WarmStart

__all__: list[str] = ["AntiCollapseTripletTraining", "EmbeddingProjector", "HardnessManipulationTraining",
                      "MaxShiftAdversarialTraining", "RobustnessEvaluation", "WarmStart"]
