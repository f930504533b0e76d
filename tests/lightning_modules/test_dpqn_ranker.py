"""DPQN (soft PQ layer, end-to-end) and k-means PQ rankers: the contract, SDC / ADC, bit budgets."""

from __future__ import annotations


import faiss
import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import DotProductSimilarity
from pytorch_metric_learning.losses import TripletMarginLoss

from robust_ranking.cli import train
from robust_ranking.data import SyntheticDataModule
from robust_ranking.lightning_modules import DPQNRanker, KMeansPQRanker, LeNet, SoftProductQuantizer
from robust_ranking.lightning_modules.soft_product_quantizer import split_bits
from robust_ranking.retrieval import PQIndex
from robust_ranking.retrieval.topk_metrics import map_at_topk
from run_helpers import REPO, resolved_config
from run_helpers import fit_with_adam



def make_dpqn(num_bits: int = 16, num_codebooks: int = 4, dim: int = 16, alpha: float = 10.0) -> DPQNRanker:
    torch.manual_seed(0)
    return DPQNRanker(LeNet(embedding_dim=dim), TripletMarginLoss(margin=0.8, distance=DotProductSimilarity()),
                      num_bits=num_bits, num_codebooks=num_codebooks, alpha=alpha)


def synthetic() -> SyntheticDataModule:
    dm = SyntheticDataModule(protocol="query_database", num_queries=24, database="test_rest", test_per_class=30)
    dm.setup()
    return dm


def split_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return images, dataset.labels


# ----------------------------------------------------------------- bit budgets
@pytest.mark.parametrize("bits, m, k", [(16, 4, 16), (24, 4, 64), (32, 4, 256), (36, 4, 512), (24, 3, 256)])
def test_bit_budgets_factor_into_m_codebooks_of_k_codewords(bits, m, k):
    assert split_bits(bits, m) == k
    model = make_dpqn(num_bits=bits, num_codebooks=m, dim=12 * m)
    assert model.codebooks.shape == (m, k, 12) and model.num_bits == bits


def test_bad_bit_budgets_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="30-bit code does not split into num_codebooks=4"):
        make_dpqn(num_bits=30)
    with pytest.raises(ValueError, match="at most 2\\^16"):
        split_bits(36, 2)
    with pytest.raises(ValueError, match="feature dimension 18 does not split into num_codebooks=4"):
        make_dpqn(dim=18)
    with pytest.raises(ValueError, match="num_bits must be a positive integer"):
        split_bits(0, 4)


# ----------------------------------------------------------------- soft PQ layer
@torch.no_grad()
def test_soft_assignment_tends_to_the_hard_one_as_the_temperature_grows():
    quantizer = SoftProductQuantizer(num_codebooks=3, num_codewords=16, sub_dim=4, alpha=1.0)
    z = quantizer.intra_normalize(torch.randn(50, 12, generator=torch.Generator().manual_seed(0)))
    hard = torch.nn.functional.one_hot(quantizer.hard_codes(z), 16).float()
    gaps = [float((quantizer.soft_assignment(z, alpha) - hard).abs().mean()) for alpha in (1, 10, 100, 1e4, 1e6)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert float((quantizer.soft_assignment(z, 1e6) - hard).abs().max()) < 1e-3
    # and the soft-quantized feature tends to the hard reconstruction q(z)
    error = (quantizer.soft_quantize(z, 1e6) - quantizer.decode(quantizer.hard_codes(z))).abs().max()
    assert float(error) < 1e-3


def test_euclidean_soft_assignment_peaks_at_the_nearest_centroid():
    quantizer = SoftProductQuantizer(2, 8, 3, alpha=5.0, similarity="euclidean")
    z = torch.randn(20, 6)
    nearest = torch.cdist(z.view(20, 2, 1, 3), quantizer.codebooks.unsqueeze(0)).squeeze(-2).argmin(-1)
    assert torch.equal(quantizer.hard_codes(z), nearest)
    assert torch.equal(quantizer.soft_assignment(z).argmax(-1), nearest)


# ----------------------------------------------------------------- contract
def test_dpqn_ranker_contract():
    model = make_dpqn(num_bits=16, num_codebooks=4, dim=16).eval()
    x = torch.rand(10, 1, 28, 28)
    z = model.embed(x)
    assert z.shape == (10, 16) and torch.allclose(z.view(10, 4, 4).norm(dim=-1), torch.ones(10, 4))
    codes = model.encode(x)
    assert codes.shape == (10, 4) and codes.dtype == torch.long and 0 <= int(codes.min()) <= int(codes.max()) < 16
    assert model.capabilities == {"codebooks"}
    torch.testing.assert_close(model.code_distance(codes, codes), model.sdc_distance(codes, codes))
    # SDC is the distance between reconstructions, ADC between the query feature and them
    recon = model.quantizer.decode(codes)
    torch.testing.assert_close(model.sdc_distance(codes, codes), torch.cdist(recon, recon), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(model.adc_distance(z, codes), torch.cdist(z, recon), atol=2e-3, rtol=1e-3)
    assert model.distance(z.view(2, 5, 16), z.view(2, 5, 16)).shape == (2, 5, 5)  # broadcasts over leading dims
    index = model.build_index(codes)
    assert isinstance(index, PQIndex) and index.mode == "sdc"
    assert torch.equal(index.search(codes, 10)[1],
                       torch.sort(model.code_distance(codes, codes), dim=1, stable=True).indices)


def test_dpqn_trains_end_to_end_and_retrieves_by_sdc_and_adc():
    dm = synthetic()
    model = make_dpqn(num_bits=8, num_codebooks=2, dim=16)
    q_images, q_labels = split_tensors(dm.query_set)
    db_images, db_labels = split_tensors(dm.database_set)

    def maps() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            db = model.encode(db_images)
            sdc = map_at_topk(model.sdc_distance(model.encode(q_images), db), q_labels, db_labels)
            adc = map_at_topk(model.adc_distance(model.embed(q_images), db), q_labels, db_labels)
        model.train()
        return sdc, adc

    before = maps()
    codewords = model.quantizer.codewords.detach().clone()
    fit_with_adam(model, dm, 3)
    after = maps()
    assert not torch.equal(codewords, model.quantizer.codewords)  # the codebooks are learned
    assert after[0] > before[0] and after[1] > before[1] and min(after) > 0.8, (before, after)


# ----------------------------------------------------------------- k-means PQ
def test_kmeans_pq_on_a_metric_ranker(tiny_ranker):
    ranker = tiny_ranker.model
    images = torch.stack([tiny_ranker.datamodule.eval_set[i][0] for i in range(100)])
    with torch.no_grad():
        embeddings = ranker.embed(images)
    model = KMeansPQRanker.fit(ranker, embeddings, num_bits=8, num_codebooks=2, seed=0).eval()
    assert model.codebooks.shape == (2, 16, 8) and model.capabilities == {"codebooks"}
    codes = model.encode(images)
    # the stored codes are faiss's own L2 PQ codes of the embeddings (Eq. 1)
    pq = faiss.ProductQuantizer(16, 2, 4)
    faiss.copy_array_to_vector(model.codebooks.numpy().reshape(-1), pq.centroids)
    expected = pq.compute_codes(np.ascontiguousarray(embeddings.numpy()))
    packed = (codes[:, 0] | (codes[:, 1] << 4)).numpy().astype(np.uint8)[:, None]  # 2 x 4 bits in one byte
    np.testing.assert_array_equal(packed, expected)
    # embed / distance are the wrapped ranker's
    assert torch.equal(model.embed(images), embeddings)
    with pytest.raises(ValueError, match="does not split into num_codebooks=3"):
        KMeansPQRanker.fit(ranker, embeddings, num_bits=12, num_codebooks=3)
    with pytest.raises(ValueError, match="26-bit code does not split"):
        KMeansPQRanker.fit(ranker, embeddings, num_bits=26, num_codebooks=4)
    with pytest.raises(RuntimeError, match="not trained"):
        model.training_step((images, torch.zeros(100), torch.arange(100)), 0)
    # an unfitted model has no codebooks capability; a saved state dict restores the fitted one
    unfitted = KMeansPQRanker(ranker, num_bits=8, num_codebooks=2, feature_dim=16).eval()
    assert unfitted.capabilities == set() and unfitted.codebooks is None
    with pytest.raises(RuntimeError, match="not fitted"):
        unfitted.encode(images)
    unfitted.load_state_dict(model.state_dict(), strict=True)
    assert unfitted.capabilities == {"codebooks"} and torch.equal(unfitted.encode(images), codes)


# ----------------------------------------------------------------- configs / train.py
CONFIGS = {bits: REPO / "configs" / f"fashion_mnist_dpqn_{bits}bit.yaml" for bits in (16, 24, 32, 36)}


@pytest.mark.parametrize("bits", sorted(CONFIGS))
def test_dpqn_configs_have_the_documented_bit_budgets(bits):
    spec = resolved_config("--config", str(CONFIGS[bits]))  # a paper config is a stack of overlays
    args = spec["model"]["init_args"]
    assert spec["model"]["class_path"] == "robust_ranking.lightning_modules.DPQNRanker"
    assert args["num_bits"] == bits and args["num_codebooks"] == 4
    assert split_bits(bits, 4) == {16: 16, 24: 64, 32: 256, 36: 512}[bits]
    assert spec["trainer"]["logger"]["init_args"]["name"] == CONFIGS[bits].stem
    assert spec["data"]["init_args"]["protocol"] == "query_database"


def test_train_py_fits_dpqn_and_logs_sdc_and_adc_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = train.main([
        "fit", "--config", str(CONFIGS[24]), "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1",
        "--data", "robust_ranking.data.SyntheticDataModule", "--data.batch_size", "16", "--data.samples_per_class", "4",
        "--data.num_queries", "16", "--model.init_args.backbone.init_args.embedding_dim", "16",
    ])
    metrics = cli.trainer.callback_metrics
    assert {"val/map", "val/recall@1", "val/adc_map", "val/adc_recall@1", "val/nmi"} <= set(metrics)
    assert cli.trainer.checkpoint_callback.monitor == "val/adc_map"
    assert 0.0 <= float(metrics["val/adc_map"]) <= 1.0
    # the checkpoint records the config: load_ranker rebuilds the whole DPQN (what eval.py does)
    from robust_ranking.lightning_modules import load_ranker

    restored = load_ranker(cli.trainer.checkpoint_callback.best_model_path).eval()
    x = torch.rand(4, 1, 28, 28)
    assert isinstance(restored, DPQNRanker) and torch.equal(restored.encode(x), cli.model.eval().encode(x))


def test_kmeans_pq_checkpoint_is_rebuilt_from_a_config_section(tiny_ranker):
    """What eval.py does with robust_ranking.cli.kmeans_pq output: config -> model -> state dict."""
    from jsonargparse import ArgumentParser

    from robust_ranking.lightning_modules import Ranker

    ranker = tiny_ranker.model
    images = torch.stack([tiny_ranker.datamodule.eval_set[i][0] for i in range(100)])
    with torch.no_grad():
        fitted = KMeansPQRanker.fit(ranker, ranker.embed(images), num_bits=8, num_codebooks=2).eval()
    section = {"class_path": "robust_ranking.lightning_modules.KMeansPQRanker", "init_args": {
        "ranker": {"class_path": "robust_ranking.lightning_modules.MetricRanker", "init_args": {
            "backbone": {"class_path": "robust_ranking.lightning_modules.LeNet", "init_args": {"embedding_dim": 16}},
            "loss": {"class_path": "pytorch_metric_learning.losses.TripletMarginLoss",
                     "init_args": {"margin": 0.2, "distance": {
                         "class_path": "pytorch_metric_learning.distances.CosineSimilarity"}}}}},
        "num_bits": 8, "num_codebooks": 2, "feature_dim": 16}}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Ranker, "model", fail_untyped=False)
    model = parser.instantiate_classes(parser.parse_object({"model": section})).model
    model.load_state_dict(fitted.state_dict(), strict=True)
    assert torch.equal(model.eval().encode(images), fitted.encode(images))
