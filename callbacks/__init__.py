"""Lightning callbacks: in-loop adversarial training, robustness evaluation, image logging, warm start."""

from callbacks.max_shift_adversarial_training import MaxShiftAdversarialTraining
from callbacks.robustness_evaluation import RobustnessEvaluation
from callbacks.warm_start import WarmStart

__all__: list[str] = ["MaxShiftAdversarialTraining", "RobustnessEvaluation", "WarmStart"]
