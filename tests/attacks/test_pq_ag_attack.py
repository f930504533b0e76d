"""PQ-AG (Basic / APD / AOD) on DPQN and k-means PQ, and the ranking attacks on DPQN."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.distances import DotProductSimilarity
from pytorch_metric_learning.losses import TripletMarginLoss

from robust_ranking import CONFIGS
from robust_ranking.attacks import CandidateAttack, Gallery, NotApplicableError, PQAGAttack, QueryAttack, query_average_precision
from robust_ranking.data import SyntheticDataModule
from robust_ranking.lightning_modules import DPQNRanker, KMeansPQRanker, LeNet
from robust_ranking.evaluation.registry import PQ_AG_METRICS
from run_helpers import fit_with_adam

EPS = 0.1  # the synthetic classes are far apart: 8/255 barely moves a 16-d toy model


class Setup:
    """A tiny trained model, its query set and its database (codes + labels)."""

    def __init__(self, model, queries, query_labels, db_images, db_labels) -> None:
        self.model = model
        self.queries, self.query_labels = queries, query_labels
        with torch.no_grad():
            self.gallery = Gallery(model.encode(db_images), db_labels)


def _split(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([dataset[i][0] for i in range(len(dataset))]), dataset.labels


@pytest.fixture(scope="module")
def data() -> SyntheticDataModule:
    dm = SyntheticDataModule(protocol="query_database", num_queries=24, database="test_rest", test_per_class=30)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def dpqn(data) -> Setup:
    torch.manual_seed(0)
    model = DPQNRanker(LeNet(embedding_dim=16), TripletMarginLoss(margin=0.8, distance=DotProductSimilarity()),
                       num_bits=8, num_codebooks=2, alpha=10.0)
    fit_with_adam(model, data, 3)
    model.eval()
    return Setup(model, *_split(data.query_set), *_split(data.database_set))


@pytest.fixture(scope="module")
def kmeans_pq(tiny_ranker, data) -> Setup:
    db_images, db_labels = _split(data.database_set)
    ranker = tiny_ranker.model
    with torch.no_grad():
        model = KMeansPQRanker.fit(ranker, ranker.embed(db_images), num_bits=8, num_codebooks=2).eval()
    return Setup(model, *_split(data.query_set), db_images, db_labels)


def run(setup: Setup, attack: PQAGAttack):
    indices = torch.arange(len(setup.queries))
    return attack(setup.model, setup.gallery, setup.queries, indices, query_labels=setup.query_labels)


@pytest.mark.parametrize("variant", ["basic", "apd", "aod"])
@pytest.mark.parametrize("family", ["dpqn", "kmeans_pq"])
def test_each_variant_lowers_the_map_and_respects_the_budget(variant, family, request):
    setup = request.getfixturevalue(family)
    result = run(setup, PQAGAttack(variant, eps=EPS, steps=10))
    m = {k: float(v.mean()) for k, v in result.metrics.items()}
    assert m["ap_sdc_clean"] > 0.8 and m["ap_adc_clean"] > 0.8, m
    assert m["ap_sdc"] < m["ap_sdc_clean"] - 0.1 and m["ap_adc"] < m["ap_adc_clean"] - 0.1, m
    assert m["code_change"] > 0
    # eps-ball and [0, 1] box
    assert float(result.perturbation.abs().max()) <= EPS + 1e-6
    assert float(result.adversarial.min()) >= 0.0 and float(result.adversarial.max()) <= 1.0
    torch.testing.assert_close(result.perturbation, result.adversarial - setup.queries)
    # the clean metrics are the clean mAP of the protocol
    clean = query_average_precision(setup.model, setup.gallery, setup.queries, setup.query_labels)
    torch.testing.assert_close(result.metrics["ap_sdc_clean"], clean["ap_sdc"])


def test_paper_defaults_and_topk(dpqn):
    attack = PQAGAttack("aod")
    assert (attack.eps, attack.alpha, attack.steps, attack.random_start) == (8 / 255, 0.01, 5, True)
    assert attack.name == "PQ-AG:AOD" and attack.needs == {"codebooks"} and PQAGAttack("basic").needs == set()
    result = run(dpqn, PQAGAttack("apd", topk=5))
    assert set(result.metrics) == {"ap_sdc", "ap_sdc_clean", "ap_adc", "ap_adc_clean", "code_change", "feature_shift",
                                   "peak_probability_clean", "entropy_clean"}
    assert set(result.metrics) == set(PQ_AG_METRICS)
    assert float(result.perturbation.abs().max()) <= 8 / 255 + 1e-6
    # feature shift and the clean soft assignment's statistics, per query (docs/results/pq_ag.md's analysis)
    model, queries = dpqn.model, dpqn.queries
    with torch.no_grad():
        clean, adv = model.embed(queries), model.embed(result.adversarial)
        p = model.soft_assignment(clean)
    torch.testing.assert_close(result.metrics["feature_shift"], (adv - clean).pow(2).sum(-1))
    torch.testing.assert_close(result.metrics["peak_probability_clean"], p.max(-1).values.mean(-1))
    torch.testing.assert_close(result.metrics["entropy_clean"], -(p * p.clamp_min(1e-30).log()).sum(-1).mean(-1))
    assert bool((result.metrics["feature_shift"] > 0).any())


def test_results_do_not_depend_on_batching(dpqn):
    attack = PQAGAttack("aod", eps=EPS)
    whole = run(dpqn, attack)
    part = attack(dpqn.model, dpqn.gallery, dpqn.queries[5:9], torch.arange(5, 9),
                  query_labels=dpqn.query_labels[5:9])
    torch.testing.assert_close(part.adversarial, whole.adversarial[5:9])


def test_codebook_attacks_are_not_applicable_to_a_metric_ranker(tiny_ranker, data):
    ranker = tiny_ranker.model
    queries, labels = _split(data.query_set)
    db_images, db_labels = _split(data.database_set)
    with torch.no_grad():
        gallery = Gallery(ranker.encode(db_images), db_labels)
    for variant in ("apd", "aod"):
        with pytest.raises(NotApplicableError, match="needs model capabilities \\['codebooks'\\]"):
            PQAGAttack(variant)(ranker, gallery, queries, torch.arange(len(queries)), query_labels=labels)
    # Basic needs nothing beyond embed: AP under the ranker's own code distance
    result = PQAGAttack("basic", eps=EPS)(ranker, gallery, queries, torch.arange(len(queries)), query_labels=labels)
    assert set(result.metrics) == {"ap", "ap_clean", "feature_shift"}
    assert float(result.metrics["ap"].mean()) < float(result.metrics["ap_clean"].mean())


def test_bad_input(dpqn):
    with pytest.raises(ValueError, match="variant must be one of"):
        PQAGAttack("peak")
    with pytest.raises(ValueError, match="pass query_labels"):
        PQAGAttack("aod")(dpqn.model, dpqn.gallery, dpqn.queries, torch.arange(len(dpqn.queries)))
    with pytest.raises(ValueError, match="eps must be in"):
        PQAGAttack("aod", eps=2.0)
    with pytest.raises(ValueError, match="topk must be"):
        PQAGAttack("aod", topk=0)


def test_works_under_inference_mode(dpqn):
    with torch.inference_mode():
        result = run(dpqn, PQAGAttack("aod", eps=EPS))
    assert float(result.metrics["ap_adc"].mean()) < float(result.metrics["ap_adc_clean"].mean())


def test_ranking_attacks_run_on_dpqn_through_embed(dpqn):
    model = dpqn.model
    with torch.no_grad():
        gallery = Gallery(model.embed(dpqn.queries), dpqn.query_labels)  # the ECCV protocol: X = queries
    idx = torch.arange(8)
    for attack, direction in ((CandidateAttack("+", w=1, eps=EPS), "+"), (QueryAttack("-", m=1, eps=EPS), "-")):
        result = attack(model, gallery, dpqn.queries[idx], idx)
        rank, clean = float(result.metrics["rank"].mean()), float(result.metrics["rank_clean"].mean())
        assert rank < clean if direction == "+" else rank > clean


def test_registered_in_the_engine_with_the_paper_suite():

    from robust_ranking.evaluation import ATTACKS, Suite

    suite = Suite.from_yaml(CONFIGS / "suites/pqag_table.yaml")
    assert [spec.attack for spec in suite.attacks] == ["PQ-AG:Basic", "PQ-AG:APD", "PQ-AG:AOD"]
    for spec in suite.attacks:
        entry = ATTACKS.get(spec.attack)
        assert entry.protocol == "query_database" and entry.needs == {"codebooks"} and entry.metric == "ap_sdc"
        attack = entry.build(spec.epsilons[0], None, suite.seed, **spec.options)
        assert (attack.eps, attack.alpha, attack.steps, attack.random_start) == (8 / 255, 0.01, 5, True)
