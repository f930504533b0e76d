"""Top-of-the-ranking helpers of the RobRank ERS attacks (ES:R, LTM, GTM, GTT), batched.

Conventions are those of the clean retrieval metrics and of :mod:`attacks.ranks`: X is both
query set and gallery, an attacked query is the gallery member ``sample_indices[b]`` and its own
entry is excluded from its ranking ("self excluded"); the ranking is by ascending distance with
ties broken by the smaller gallery index (stable).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robust_ranking.attacks.gallery import Gallery

__all__ = ["query_distances", "self_mask", "nearest_non_self", "recall_at_1", "stable_position"]


def query_distances(model: nn.Module, x: Tensor, gallery: Gallery) -> Tensor:
    """``d(f(x_b), X)`` for every attacked image and gallery item: ``[B, N]`` (one embed of the batch)."""
    return model.distance(model.embed(x)[:, None, :], gallery.embeddings).squeeze(1)


def self_mask(sample_indices: Tensor, n: int) -> Tensor:
    """``[B, N]``: True at each query's own gallery entry."""
    return torch.arange(n, device=sample_indices.device)[None, :] == sample_indices[:, None]


def nearest_non_self(distances: Tensor, sample_indices: Tensor) -> Tensor:
    """The top-1 gallery index of each row with the query itself excluded ``[B]`` (ties: smaller index)."""
    masked = distances.masked_fill(self_mask(sample_indices, distances.shape[1]), float("inf"))
    return masked.argmin(dim=1)  # argmin returns the first minimum: the smaller index wins ties


def recall_at_1(distances: Tensor, sample_indices: Tensor, gallery_labels: Tensor) -> Tensor:
    """Per-query Recall@1 in percent ``[B]`` (100: the top-1 non-self item has the query's label, else 0)."""
    labels = gallery_labels.to(distances.device)
    top1 = nearest_non_self(distances, sample_indices)
    return (labels[top1] == labels[sample_indices]).to(distances.dtype) * 100.0


def stable_position(distances: Tensor, sample_indices: Tensor, target: Tensor) -> Tensor:
    """0-based position ``[B]`` of gallery item ``target[b]`` in row b's ranking, self excluded:
    the number of other non-self items ranked before it (closer, or as close with a smaller index)."""
    n = distances.shape[1]
    d_t = distances.gather(1, target[:, None])
    arange = torch.arange(n, device=distances.device)[None, :]
    before = (distances < d_t) | ((distances == d_t) & (arange < target[:, None]))
    before &= ~self_mask(sample_indices, n) & (arange != target[:, None])
    return before.sum(dim=1)
