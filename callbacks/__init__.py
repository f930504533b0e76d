"""Lightning callbacks: in-loop adversarial training, robustness evaluation, image logging."""

from callbacks.max_shift_adversarial_training import MaxShiftAdversarialTraining

__all__: list[str] = ["MaxShiftAdversarialTraining"]
