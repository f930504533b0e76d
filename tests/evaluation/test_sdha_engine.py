"""The hashing attacks through the evaluation engine: registry, query / database protocol, world size 2 = 1."""

from __future__ import annotations

import copy

import pytest
import torch

from robust_ranking.evaluation import ATTACKS, RobustnessEvaluator, Suite, SuiteError
from robust_ranking.data import SyntheticDataModule
from robust_ranking.lightning_modules import DCHLoss, DCHRanker, LeNet
from run_helpers import on_thread_ranks, fit_with_adam

SUITE = {
    "name": "sdha_test", "num_samples": 10, "seed": 0, "batch_size": 4,
    "attacks": [
        {"attack": "SDHA", "epsilons": [0.3], "steps": 20, "check_every": 5, "lagrange": 100, "topk": 16},
        {"attack": "HAG", "epsilons": [0.3], "steps": 20, "check_every": 5, "topk": 16},
        {"attack": "SDHA-T", "epsilons": [0.3], "steps": 20, "check_every": 5, "lagrange": 100, "topk": 16,
         "target_label": "random"},
        {"attack": "DHTA", "epsilons": [0.3], "steps": 20, "check_every": 5, "alpha": 0.01, "topk": 16,
         "target_label": "random"},
    ],
}


@pytest.fixture(scope="module")
def dch_split():
    dm = SyntheticDataModule(protocol="query_database", num_queries=16, test_per_class=8, seed=0)
    dm.setup()
    torch.manual_seed(0)
    model = DCHRanker(LeNet(embedding_dim=32), DCHLoss(), hash_bits=16)
    fit_with_adam(model, dm, 3)
    return model.eval(), dm


def evaluate(model, dm, collectives=None):
    torch.set_num_threads(1)  # also in the rank threads below: the OpenMP thread count is per thread
    evaluator = RobustnessEvaluator(Suite.from_dict(SUITE), progress=False)
    return evaluator.run(model, dm.eval_set, collectives=collectives, embed_batch_size=32,
                         query_set=dm.query_set, database_set=dm.database_set)


def test_registered_names_and_suite_errors():
    for name in ("SDHA", "SDHA-UW", "HAG", "SDHA-T", "SDHA-UW-T", "DHTA"):
        entry = ATTACKS.get(name)
        assert entry.protocol == "query_database" and entry.needs == {"hash_bits"} and entry.metric == "ap"
    targeted_without_label = {**SUITE, "attacks": [{"attack": "SDHA-T", "epsilons": [0.039]}]}
    with pytest.raises(SuiteError, match="needs target_label"):
        Suite.from_dict(targeted_without_label)
    with pytest.raises(SuiteError, match="random_start must be false"):
        Suite.from_dict({**SUITE, "attacks": [{"attack": "HAG", "epsilons": [0.039], "random_start": True}]})


def test_suite_tanh_scale_factor_multiplies_the_papers_schedule():
    from robust_ranking.attacks.hashing.hashing_attack import PAPER_TANH_SCALES

    for name in ("SDHA", "HAG", "DHTA"):
        options = {"target_label": "random"} if name == "DHTA" else {}
        attack = ATTACKS.get(name).build(0.1, None, 0, tanh_scale_factor=8, **options)
        assert attack.tanh_scales == tuple((f, 8 * g) for f, g in PAPER_TANH_SCALES)
        assert ATTACKS.get(name).build(0.1, None, 0, **options).tanh_scales == PAPER_TANH_SCALES
    suite = {**SUITE, "attacks": [{"attack": "SDHA", "epsilons": [0.1], "tanh_scale_factor": 4.0}]}
    assert Suite.from_dict(suite).attacks[0].options["tanh_scale_factor"] == 4.0
    for bad in (0, -1.0, "fast", True):
        with pytest.raises(ValueError, match="tanh_scale_factor must be a number > 0"):
            ATTACKS.get("SDHA").build(0.1, None, 0, tanh_scale_factor=bad)
    # 'auto' is the engine's (computed per model and workload, tests/scripts/test_sdha_scripts.py); refused outside it
    with pytest.raises(ValueError, match="'auto' is computed by the evaluation engine"):
        ATTACKS.get("SDHA").build(0.1, None, 0, tanh_scale_factor="auto")


def test_suite_options_goal_ap_and_search_steps():
    suite = {**SUITE, "attacks": [{"attack": "SDHA-T", "epsilons": [0.3], "target_label": "random", "goal_ap": 0.9,
                                   "search_steps": 3}, {"attack": "DHTA", "epsilons": [0.3],
                                                        "target_label": "random", "goal_ap": 0.9}]}
    sdha, dhta = Suite.from_dict(suite).attacks
    attack = ATTACKS.get("SDHA-T").build(0.3, None, 0, **sdha.options)
    assert attack.goal_ap == 0.9 and attack.search_steps == 3
    assert ATTACKS.get("DHTA").build(0.3, None, 0, **dhta.options).goal_ap == 0.9
    assert {"lagrange", "search_iterations"} <= set(ATTACKS.get("SDHA-T").metrics)
    with pytest.raises(SuiteError, match="search_steps"):
        Suite.from_dict({**SUITE, "attacks": [{"attack": "HAG", "epsilons": [0.1], "search_steps": 2}]})


def test_engine_runs_the_hashing_attacks_on_the_query_database_split(dch_split):
    model, dm = dch_split
    results = evaluate(model, dm)
    by_name = {r.attack: r for r in results.results if r.metric == "ap"}
    assert set(by_name) == {"SDHA", "HAG", "SDHA-T", "DHTA"}
    for name in ("SDHA", "HAG"):
        assert by_name[name].mean < by_name[name].clean and by_name[name].count == 10
    for name in ("SDHA-T", "DHTA"):
        assert by_name[name].mean > by_name[name].clean
    assert {"l2", "l2_at_target", "success", "iterations"} <= set(by_name["SDHA"].extra)


def test_world_size_two_gives_the_single_process_numbers(dch_split):
    model, dm = dch_split
    single = evaluate(model, dm)
    outputs = on_thread_ranks(lambda collectives: evaluate(copy.deepcopy(model), dm, collectives))
    for rank in (0, 1):
        for a, b in zip(single.results, outputs[rank].results, strict=True):
            assert (a.attack, a.mean, a.clean, a.count) == (b.attack, b.mean, b.clean, b.count), rank
            assert a.extra == b.extra, rank  # exact: per-query numbers do not depend on the batch
