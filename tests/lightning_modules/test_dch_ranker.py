"""DCH loss and ranker: the loss formula, the ranker contract, training on synthetic data."""

from __future__ import annotations

import math

import pytest
import torch

from robust_ranking.data import SyntheticDataModule
from robust_ranking.lightning_modules import DCHLoss, DCHRanker, LeNet
from robust_ranking.lightning_modules.dch_loss import normalized_hamming_distance
from robust_ranking.retrieval import HammingIndex, evaluate_hashing
from run_helpers import fit_with_adam


def reference_dch_loss(codes, labels, gamma, lam, eps=1e-4):
    """Plain-Python DCH Eq. 3-8 (means instead of sums)."""
    n, k = codes.shape
    sim, dis = [], []
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            cos = float(torch.dot(codes[i], codes[j]) / (codes[i].norm() * codes[j].norm()))
            d = k / 2 * (1 - cos)
            if labels[i] == labels[j]:
                sim.append(-math.log(gamma / (gamma + d)))  # -log sigma(d)
            else:
                d = max(d, eps)
                sim_prob = gamma / (gamma + d)
                dis.append(-math.log(1 - sim_prob))
    quant = []
    for i in range(n):
        a = codes[i].abs()
        cos = float(a.sum() / (a.norm() * math.sqrt(k)))
        quant.append(math.log(1 + k / 2 * (1 - cos) / gamma))
    return sum(sim) / len(sim) + sum(dis) / len(dis) + lam * sum(quant) / n


def test_dch_loss_matches_the_paper_formula():
    g = torch.Generator().manual_seed(0)
    codes = torch.tanh(torch.randn(7, 16, generator=g) * 2)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 0])
    loss = DCHLoss(gamma=20.0, quantization_weight=0.1)(codes, labels)
    assert float(loss) == pytest.approx(reference_dch_loss(codes, labels, 20.0, 0.1), rel=1e-5)


def test_dch_loss_behaviour():
    codes = torch.tensor([[1.0, 1, 1, 1], [1.0, 1, 1, 1], [-1.0, -1, -1, -1]])
    # binary codes: normalized distance = Hamming distance, quantization loss 0
    assert torch.allclose(normalized_hamming_distance(codes, codes), torch.tensor([[0.0, 0, 4], [0, 0, 4], [4, 4, 0]]))
    pair, quant = DCHLoss(gamma=2.0).components(codes, torch.tensor([0, 0, 1]))
    assert float(quant) == pytest.approx(0.0, abs=1e-6)
    # similar pair at distance 0 costs 0; dissimilar pairs at distance 4: log(1 + 2 / 4)
    assert float(pair) == pytest.approx(math.log(1.5), rel=1e-6)
    # identical codes in different classes stay finite (d clamped at eps)
    loss = DCHLoss()(codes[:2], torch.tensor([0, 1]))
    assert torch.isfinite(loss)
    for bad in ({"gamma": 0.0}, {"quantization_weight": -1.0}, {"eps": float("nan")}):
        with pytest.raises(ValueError, match="DCHLoss"):
            DCHLoss(**bad)


def test_ranker_contract():
    torch.manual_seed(0)
    model = DCHRanker(LeNet(embedding_dim=32), DCHLoss(), hash_bits=16).eval()
    x = torch.rand(5, 1, 28, 28)
    assert model.capabilities == {"hash_bits"} and model.hash_bits == 16
    g = model.hash_logits(x)
    emb = model.embed(x)
    assert emb.shape == (5, 16) and bool((emb.abs() < 1).all())
    torch.testing.assert_close(model.embed(x, scale=0.1), torch.tanh(0.1 * g))
    codes = model.encode(x)
    assert set(codes.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(codes, torch.where(g > 0, 1.0, -1.0))
    # code_distance is the Hamming distance; distance broadcasts over leading dims
    hd = model.code_distance(codes, codes)
    assert torch.equal(hd, (codes[:, None, :] != codes[None, :, :]).sum(-1).float())
    assert model.distance(emb[None].expand(3, 5, 16), emb[:2]).shape == (3, 5, 2)
    index = model.build_index(codes)
    assert isinstance(index, HammingIndex)
    dist, ids = index.search(codes, 5)
    assert torch.equal(dist[:, 0], torch.zeros(5)) and torch.equal(dist, hd.sort(1).values)


@pytest.mark.parametrize("bits", [0, 12, True, 7.0])
def test_bad_hash_bits_is_a_clear_error(bits):
    with pytest.raises(ValueError, match="hash_bits must be a positive multiple of 8"):
        DCHRanker(LeNet(embedding_dim=8), hash_bits=bits)


def test_training_separates_classes_in_hamming_space():
    dm = SyntheticDataModule(protocol="query_database", num_queries=16, seed=0)
    dm.setup()
    torch.manual_seed(0)
    model = DCHRanker(LeNet(embedding_dim=32), DCHLoss(gamma=20.0), hash_bits=16)

    def clean_map() -> float:
        model.eval()
        xq = torch.stack([dm.query_set[i][0] for i in range(len(dm.query_set))])
        xd = torch.stack([dm.database_set[i][0] for i in range(len(dm.database_set))])
        out = evaluate_hashing(model.encode(xq), dm.query_labels, model.encode(xd), dm.database_labels)
        model.train()
        return float(out["map@1000"])

    before = clean_map()
    fit_with_adam(model, dm, 3)
    after = clean_map()
    assert after > max(before, 0.9)

