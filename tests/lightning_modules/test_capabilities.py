"""The optional parts of the ranker contract are declared Protocols, and the attacks check them."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import TripletMarginLoss

from robust_ranking.attacks import NotApplicableError, PQAGAttack, SDHAAttack
from robust_ranking.lightning_modules import (
    DCHRanker,
    DPQNRanker,
    HashingRanker,
    LeNet,
    MetricRanker,
    ProductQuantizationRanker,
    TrainingLossRanker,
)


def test_each_family_declares_its_capabilities():
    metric = MetricRanker(LeNet(embedding_dim=8), TripletMarginLoss(distance=CosineSimilarity()))
    dch = DCHRanker(LeNet(embedding_dim=8), hash_bits=16)
    dpqn = DPQNRanker(LeNet(embedding_dim=8), TripletMarginLoss(distance=CosineSimilarity()), num_bits=8,
                      num_codebooks=2)
    assert isinstance(dch, HashingRanker) and not isinstance(metric, HashingRanker)
    assert isinstance(dpqn, ProductQuantizationRanker) and not isinstance(metric, ProductQuantizationRanker)
    assert all(isinstance(m, TrainingLossRanker) for m in (metric, dch, dpqn))
    assert dch.capabilities == {"hash_bits"} and dpqn.capabilities == {"codebooks"} and metric.capabilities == set()


class _BitsButNoLogits(torch.nn.Module):
    """Says it has hash bits (a capability name) but does not implement the hashing Protocol."""

    hash_bits = 16
    capabilities = {"hash_bits"}

    def embed(self, x):
        return x.flatten(1)


class _CodebooksButNoAssignment(torch.nn.Module):
    codebooks = torch.zeros(2, 4, 2)
    capabilities = {"codebooks"}


def test_attacks_refuse_models_that_only_name_a_capability():
    with pytest.raises(NotApplicableError, match="needs a lightning_modules.HashingRanker"):
        SDHAAttack(eps=0.1).check_applicable(_BitsButNoLogits())
    with pytest.raises(NotApplicableError, match="needs a lightning_modules.ProductQuantizationRanker"):
        PQAGAttack("apd", eps=0.1).check_applicable(_CodebooksButNoAssignment())
    PQAGAttack("basic", eps=0.1).check_applicable(_CodebooksButNoAssignment())  # Basic only embeds
