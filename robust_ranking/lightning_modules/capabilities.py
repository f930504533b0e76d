"""The optional parts of the ranker contract, declared as Protocols.

Attacks and callbacks that need more than :class:`lightning_modules.Ranker`'s core (``embed``,
``distance``, ``encode``, ``code_distance``) check for one of these (``isinstance`` against a
runtime-checkable Protocol) instead of probing attribute names one by one:

- :class:`ProductQuantizationRanker` -- ``codebooks`` and the soft assignment the PQ-AG attacks
  (Feng et al., AAAI 2020) differentiate: DPQN, k-means PQ;
- :class:`HashingRanker` -- ``hash_bits`` and the hash-layer logits the hashing attacks (SDHA,
  HAG, DHTA) differentiate: DCH;
- :class:`TrainingLossRanker` -- ``compute_loss(embeddings, labels)``, the training loss on given
  embeddings, which the max-shift defense logs for the clean part of a mixed batch.

The names in ``Ranker.capabilities`` (``codebooks``, ``hash_bits``) stay what suites and reports
speak of; these Protocols are what code relies on.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["HashingRanker", "ProductQuantizationRanker", "TrainingLossRanker"]


@runtime_checkable
class ProductQuantizationRanker(Protocol):
    codebooks: Tensor

    def soft_assignment(self, z: Tensor, alpha: float | None = None) -> Tensor:
        """``[B, M, K]`` softmax over the codewords of each sub-space (temperature ``alpha``)."""
        ...

    def log_soft_assignment(self, z: Tensor, alpha: float | None = None) -> Tensor:
        """Its log (computed as a log-softmax, so no probability underflows to log 0)."""
        ...


@runtime_checkable
class HashingRanker(Protocol):
    hash_bits: int

    def hash_logits(self, x: Tensor) -> Tensor:
        """``[B, K]`` pre-sign logits of the hash layer for images ``x``."""
        ...


@runtime_checkable
class TrainingLossRanker(Protocol):
    def compute_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The training loss of a batch of ``embed`` outputs and their labels."""
        ...
