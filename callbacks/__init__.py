"""Lightning callbacks: in-loop adversarial training, robustness evaluation, image logging."""

from callbacks.max_shift_adversarial_training import MaxShiftAdversarialTraining
from callbacks.robustness_evaluation import RobustnessEvaluation

__all__: list[str] = ["MaxShiftAdversarialTraining", "RobustnessEvaluation"]
