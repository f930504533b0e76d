"""Transfer (black-box) attacks: adversarial examples crafted on a source model, measured on targets
(ECCV 2020 Table 5).
"""

from robust_ranking.attacks.transfer.transfer_attack import (
    TransferResult,
    embed_all,
    measure_on,
    transfer_attack,
    transfer_markdown,
    transfer_matrix,
)

__all__ = [
    "TransferResult",
    "embed_all",
    "measure_on",
    "transfer_attack",
    "transfer_markdown",
    "transfer_matrix",
]
