"""The MetricRanker implements the ranker contract consistently with its injected loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity, LpDistance
from pytorch_metric_learning.losses import ContrastiveLoss, TripletMarginLoss

from robust_ranking.lightning_modules import C2F1, InputNormalization, LeNet, MetricRanker, Ranker, ResNet18
from robust_ranking.lightning_modules.distances import cosine_distance, euclidean_distance
from robust_ranking.retrieval.index import FaissFlatIndex, TorchFlatIndex


def make_ranker(distance=None, normalize: bool = True, **kwargs) -> MetricRanker:
    torch.manual_seed(0)
    loss = TripletMarginLoss(margin=0.2, distance=distance if distance is not None else CosineSimilarity())
    return MetricRanker(backbone=LeNet(embedding_dim=16), loss=loss, normalize_embeddings=normalize, **kwargs)


@pytest.mark.parametrize(
    "backbone, shape, dim",
    [
        (C2F1(), (2, 1, 28, 28), 1024),
        (LeNet(embedding_dim=32), (2, 1, 28, 28), 32),
        (LeNet(in_channels=3, embedding_dim=8, image_size=32), (2, 3, 32, 32), 8),
        (ResNet18(in_channels=1, embedding_dim=64), (2, 1, 28, 28), 64),
        (ResNet18(in_channels=3, embedding_dim=16, small_input=False), (2, 3, 64, 64), 16),
    ],
)
def test_backbones_shapes(backbone, shape, dim):
    assert backbone(torch.rand(shape)).shape == (shape[0], dim)


def test_c2f1_refuses_bad_image_size():
    with pytest.raises(ValueError, match="divisible by 4"):
        C2F1(image_size=30)


def test_embed_is_normalized_and_differentiable():
    ranker = make_ranker()
    x = torch.rand(5, 1, 28, 28, requires_grad=True)
    e = ranker.embed(x)
    assert e.shape == (5, 16)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(5))
    (grad,) = torch.autograd.grad(e.sum(), x)
    assert grad.abs().sum() > 0
    assert isinstance(ranker, Ranker) and ranker.capabilities == set()


@pytest.mark.parametrize(
    "pml_distance, normalize",
    [(CosineSimilarity(), True), (LpDistance(p=2, normalize_embeddings=False), False), (LpDistance(), False)],
)
def test_distance_matches_the_loss_distance(pml_distance, normalize):
    """The ranker ranks by exactly the distance its loss trains (similarity s -> 1 - s)."""
    ranker = make_ranker(pml_distance, normalize=normalize)
    a, b = torch.randn(6, 16), torch.randn(7, 16)
    expected = pml_distance(a, b)
    if pml_distance.is_inverted:
        expected = 1 - expected
    torch.testing.assert_close(ranker.distance(a, b), expected, atol=1e-5, rtol=1e-5)


def test_distance_broadcasts_over_batch_dims():
    a, b = torch.randn(3, 4, 8), torch.randn(3, 5, 8)
    for fn in (cosine_distance, euclidean_distance):
        batched = fn(a, b)
        assert batched.shape == (3, 4, 5)
        for i in range(3):
            torch.testing.assert_close(batched[i], fn(a[i], b[i]))
    torch.testing.assert_close(euclidean_distance(a[0], b[0]), torch.cdist(a[0], b[0]), atol=1e-5, rtol=1e-5)


def test_euclidean_distance_has_finite_gradient_at_zero():
    a = torch.randn(1, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(euclidean_distance(a, a.detach()).sum(), a)
    assert torch.isfinite(grad).all()


def test_unsupported_distance_is_refused():
    with pytest.raises(ValueError, match="CosineSimilarity and LpDistance"):
        make_ranker(DotProductSimilarity())


def test_build_index_uses_faiss_when_it_ranks_the_same_way():
    ranker = make_ranker()
    codes = ranker.encode(torch.rand(50, 1, 28, 28))
    index = ranker.build_index(codes)
    assert isinstance(index, FaissFlatIndex)
    dist, ids = index.search(codes[:5], k=3)
    assert ids[:, 0].tolist() == list(range(5))  # each code is its own nearest neighbour
    torch.testing.assert_close(dist[:, 1], ranker.distance(codes[:5], codes).sort(dim=1).values[:, 1])
    # Cosine on unnormalized embeddings is not an inner product: brute-force torch index.
    assert isinstance(make_ranker(normalize=False).build_index(codes), TorchFlatIndex)


def test_training_step_loss_matches_pml_loss():
    torch.manual_seed(0)
    loss = ContrastiveLoss(pos_margin=1.0, neg_margin=0.5, distance=CosineSimilarity())
    ranker = MetricRanker(backbone=LeNet(embedding_dim=8), loss=loss)
    x, y = torch.rand(8, 1, 28, 28), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    expected = loss(F.normalize(ranker.backbone(x), dim=1), y)
    torch.testing.assert_close(ranker.compute_loss(ranker.embed(x), y), expected)


def test_input_normalization_is_inside_the_model():
    norm = InputNormalization(mean=[0.5], std=[0.25])
    torch.testing.assert_close(norm(torch.full((1, 1, 2, 2), 0.75)), torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="positive"):
        InputNormalization(mean=[0.5], std=[0.0])
    ranker = make_ranker(input_normalization=norm)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(ranker.embed(x), F.normalize(ranker.backbone((x - 0.5) / 0.25), dim=1))
