"""Lightning callbacks: in-loop adversarial training, robustness evaluation, image logging."""

__all__: list[str] = []
