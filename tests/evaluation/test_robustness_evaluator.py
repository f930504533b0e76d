"""The robustness engine on a tiny trained ranker: directions, eps = 0, determinism, skipping,
gallery checks, the score and the report layout."""

from __future__ import annotations

import copy
import json
import math
import threading

import pytest
import torch

from robust_ranking.attacks import CandidateAttack, MaxShiftAttack
from robust_ranking.evaluation.registry import ATTACKS, AttackRegistry
from robust_ranking.evaluation.report import Report
from robust_ranking.evaluation.engine import Collectives, RobustnessEvaluator
from robust_ranking.evaluation.score import RobustnessScore
from robust_ranking.evaluation.suite import Suite, SuiteError


def make_suite(attacks: list[dict], num_samples: int = 24, batch_size: int = 8, registry=ATTACKS,
               sanity: bool = False) -> Suite:
    """A test suite; the large-budget sanity checks (tests/evaluation/test_engine_trust.py) are off unless asked for."""
    return Suite.from_dict({"name": "test", "num_samples": num_samples, "seed": 0, "batch_size": batch_size,
                            "sanity": sanity, "attacks": attacks}, registry=registry)


ALL_ATTACKS = [
    {"attack": "CA+", "epsilons": [0.1], "w": [1, 2], "steps": 10},
    {"attack": "CA-", "epsilons": [0.1], "w": [1], "steps": 10},
    {"attack": "QA+", "epsilons": [0.1], "m": [1], "steps": 10},
    {"attack": "QA-", "epsilons": [0.1], "m": [1], "steps": 10},
    {"attack": "ES", "epsilons": [0.03, 0.1], "steps": 10},
]


@pytest.fixture(scope="module")
def full_run(tiny_ranker):
    suite = make_suite(ALL_ATTACKS, num_samples=24)
    return RobustnessEvaluator(suite, progress=False).run(tiny_ranker.model, tiny_ranker.datamodule.eval_set)


def test_every_attack_moves_ranks_in_its_direction(full_run):
    for attack in ("CA+", "QA+"):
        r = full_run.find(attack, 0.1, 1)
        assert r.mean < r.clean - 3, f"{attack} must raise the rank towards 0"
    for attack in ("CA-", "QA-"):
        r = full_run.find(attack, 0.1, 1)
        assert r.mean > r.clean + 3, f"{attack} must lower the rank towards 100"
    es_small, es_large = full_run.find("ES", 0.03), full_run.find("ES", 0.1)
    assert 0 < es_small.mean < es_large.mean and es_large.clean is None
    qa = full_run.find("QA+", 0.1, 1)
    assert qa.extra["sp_rank"] is not None and qa.extra["sp_rank_clean"] is not None
    assert full_run.num_samples == 24 and all(r.count == 24 for r in full_run.results)
    assert full_run.clean["recall@1"] > 0.9 and 0 < full_run.clean["map"] <= 1
    assert 0 <= full_run.score.value < 1 and set(full_run.score.per_attack) == {"CA+", "CA-", "QA+", "QA-"}


def test_eps_zero_row_equals_clean(tiny_ranker):
    suite = make_suite([{"attack": "CA+", "epsilons": [0, 0.1], "w": [1]},
                        {"attack": "QA-", "epsilons": [0, 0.1], "m": [2]}], num_samples=16)
    results = RobustnessEvaluator(suite, progress=False).run(tiny_ranker.model, tiny_ranker.datamodule.eval_set)
    for attack, size in (("CA+", 1), ("QA-", 2)):
        zero = results.find(attack, 0.0, size)
        assert zero.mean == zero.clean
        assert results.find(attack, 0.1, size).clean == zero.clean  # same targets at every eps
        assert zero.extra.get("sp_rank", 0) == zero.extra.get("sp_rank_clean", 0)
    markdown = Report.from_results(results, include_environment=False).to_markdown()
    rows = [line for line in markdown.splitlines() if line.startswith("| 0 |")]
    assert len(rows) == 2  # the rank table and the SP table, each with a single eps = 0 row
    expected = [f"{results.find('CA+', 0.0, 1).clean:.1f}", f"{results.find('QA-', 0.0, 2).clean:.1f}"]
    assert rows[0] == "| 0 | " + " | ".join(expected) + " |"


def test_results_are_deterministic(tiny_ranker, full_run):
    suite = make_suite(ALL_ATTACKS, num_samples=24, batch_size=8)
    again = RobustnessEvaluator(suite, progress=False).run(tiny_ranker.model, tiny_ranker.datamodule.eval_set)
    assert again.attacked_indices == full_run.attacked_indices
    for a, b in zip(full_run.results, again.results, strict=True):
        assert (a.label, a.mean, a.std, a.count, a.clean, dict(a.extra)) == (
            b.label, b.mean, b.std, b.count, b.clean, dict(b.extra))
    assert again.score == full_run.score


def test_results_barely_depend_on_the_batch_size(tiny_ranker, full_run):
    """Targets are keyed per sample, so another batch size changes nothing but float round-off
    (kernels may differ per batch shape); the ranks here match exactly, the ES shift closely."""
    suite = make_suite(ALL_ATTACKS, num_samples=24, batch_size=5)
    other = RobustnessEvaluator(suite, progress=False).run(tiny_ranker.model, tiny_ranker.datamodule.eval_set,
                                                            embed_batch_size=17)
    for a, b in zip(full_run.results, other.results, strict=True):
        if a.metric == "rank":
            assert (a.mean, a.clean) == (b.mean, b.clean)
        else:
            assert b.mean == pytest.approx(a.mean, rel=1e-3)


def test_attacked_samples_are_a_seeded_subset(tiny_ranker):
    evaluator = RobustnessEvaluator(make_suite(ALL_ATTACKS, num_samples=10), progress=False)
    first = evaluator.attacked_indices(100)
    assert torch.equal(first, evaluator.attacked_indices(100)) and first.unique().numel() == 10
    everything = RobustnessEvaluator(make_suite(ALL_ATTACKS, num_samples=-1), progress=False).attacked_indices(100)
    assert sorted(everything.tolist()) == list(range(100))
    assert RobustnessEvaluator(make_suite(ALL_ATTACKS, num_samples=500)).attacked_indices(100).numel() == 100


class _NeedsCodebooks(MaxShiftAttack):
    """A stand-in for a PQ attack: declares its need on the class."""

    name = "PQ-class"
    needs = frozenset({"codebooks"})


def test_attacks_the_model_cannot_take_are_skipped_and_reported(tiny_ranker):
    registry = AttackRegistry(list(ATTACKS))
    registry.register("PQ-dummy", lambda eps, size, seed, **o: MaxShiftAttack(eps, seed=seed, **o),
                      needs={"codebooks"}, metric="shift")
    registry.register("PQ-class", lambda eps, size, seed, **o: _NeedsCodebooks(eps, seed=seed, **o), metric="shift")
    suite = make_suite([{"attack": "PQ-dummy", "epsilons": [0.1]}, {"attack": "CA+", "epsilons": [0.1], "steps": 2},
                        {"attack": "PQ-class", "epsilons": [0.1, 0.3]}], num_samples=4, registry=registry)
    results = RobustnessEvaluator(suite, registry=registry, progress=False).run(
        tiny_ranker.model, tiny_ranker.datamodule.eval_set)
    assert [(s.attack, s.reason) for s in results.skipped] == [
        ("PQ-dummy", "not applicable: needs codebooks"), ("PQ-class", "not applicable: needs codebooks")]
    assert [r.attack for r in results.results] == ["CA+"]
    report = Report.from_results(results, include_environment=False)
    assert report.data["skipped"][0] == {"attack": "PQ-dummy", "reason": "not applicable: needs codebooks",
                                         "epsilons": [0.1]}
    assert "- PQ-dummy: not applicable: needs codebooks" in report.to_markdown()


def test_w_larger_than_the_gallery_fails_before_any_attack(tiny_ranker, monkeypatch):
    calls = []
    monkeypatch.setattr(CandidateAttack, "__call__", lambda *a, **k: calls.append(1))
    small = tiny_ranker.datamodule.eval_set.subset(torch.arange(8))
    suite = make_suite([{"attack": "CA+", "epsilons": [0.1], "w": [1, 10]}], num_samples=4)
    with pytest.raises(SuiteError, match=r"w=10 needs a gallery of more than 10 items, but the gallery has 8"):
        RobustnessEvaluator(suite, progress=False).run(tiny_ranker.model, small)
    assert not calls


def test_inference_mode_callers_are_supported(tiny_ranker):
    """Lightning's test loop calls the engine under inference mode: the engine must still work."""
    suite = make_suite([{"attack": "QA+", "epsilons": [0.1], "m": [1], "steps": 3}], num_samples=6)
    evaluator = RobustnessEvaluator(suite, progress=False)
    plain = evaluator.run(tiny_ranker.model, tiny_ranker.datamodule.eval_set)
    with torch.inference_mode():
        inside = evaluator.run(tiny_ranker.model, tiny_ranker.datamodule.eval_set)
    assert inside.results[0].mean == plain.results[0].mean


class _ThreadWorld:
    """W ranks as W threads of one process: all_gather through shared slots and a barrier.

    Exercises the engine's sharding, padding, gathering and de-duplication exactly as DDP
    does, in-process and in milliseconds (the real multi-process gloo run is in test_eval.py).
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.slots: list = [None] * world_size
        self.barrier = threading.Barrier(world_size)

    def collectives(self, rank: int) -> Collectives:
        world = self

        class ThreadCollectives(Collectives):
            def __init__(self) -> None:
                self.world_size, self.rank = world.world_size, rank

            def all_gather(self, tensor):
                world.slots[rank] = tensor.clone()
                world.barrier.wait()
                out = torch.stack(list(world.slots))
                world.barrier.wait()  # everyone has read before the next call overwrites
                return out

            def barrier(self) -> None:
                world.barrier.wait()

        return ThreadCollectives()


def test_sharded_world_gives_the_single_process_numbers(tiny_ranker, full_run):
    world = _ThreadWorld(3)  # 100 gallery items and T = 24 do not divide by 3: padding everywhere
    suite = make_suite(ALL_ATTACKS, num_samples=24, batch_size=5)
    outputs: dict[int, object] = {}
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            model = copy.deepcopy(tiny_ranker.model)  # one replica per rank, as in DDP
            outputs[rank] = RobustnessEvaluator(suite, progress=False).run(
                model, tiny_ranker.datamodule.eval_set, collectives=world.collectives(rank), embed_batch_size=16)
        except BaseException as err:  # noqa: BLE001 - surfaced below
            errors.append(err)
            world.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world.world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for rank, results in outputs.items():
        assert results.world_size == 3
        for a, b in zip(full_run.results, results.results, strict=True):
            assert (a.label, a.mean, a.std, a.count, a.clean, dict(a.extra)) == (
                b.label, b.mean, b.std, b.count, b.clean, dict(b.extra)), rank
    assert outputs[0].clean == full_run.clean and outputs[1].clean is None  # clean metrics: rank 0 only


def test_gallery_gather_deduplicates_and_sorts(tiny_ranker):
    dataset = tiny_ranker.datamodule.eval_set.subset(torch.arange(7))  # odd: the sampler pads
    evaluator = RobustnessEvaluator(make_suite(ALL_ATTACKS[:1], num_samples=2), progress=False)
    with torch.no_grad():
        gallery, _ = evaluator._embed_gallery(tiny_ranker.model, dataset, Collectives(), 3, torch.device("cpu"))
        expected = tiny_ranker.model.embed(dataset.images.float() / 255)
    torch.testing.assert_close(gallery.embeddings, expected)
    assert torch.equal(gallery.labels, dataset.labels)


def test_score_formula():
    assert RobustnessScore.term("+", 25.0, 50.0) == 0.5
    assert RobustnessScore.term("+", 60.0, 50.0) == 1.0 and RobustnessScore.term("+", 0.0, 50.0) == 0.0
    assert RobustnessScore.term("-", 2.0, 2.0) == 1.0 and RobustnessScore.term("-", 100.0, 2.0) == 0.0
    assert RobustnessScore.term("-", 51.0, 2.0) == pytest.approx(0.5)

    class R:
        def __init__(self, attack, eps, mean, clean, direction):
            self.attack, self.eps, self.mean, self.clean, self.direction = attack, eps, mean, clean, direction

    score = RobustnessScore.from_results([
        R("CA+", 0.0, 50, 50, "+"),  # eps = 0: left out
        R("CA+", 0.1, 25, 50, "+"), R("CA+", 0.3, 0, 50, "+"), R("CA+", 0.3, 50, 50, "+"),  # mean 0.5
        R("CA-", 0.1, 100, 0, "-"),  # 0
        R("ES", 0.1, 0.5, None, None),  # not scored
    ])
    assert score.per_attack == {"CA+": pytest.approx(0.5), "CA-": 0.0}
    assert score.value == pytest.approx(0.25) and score.num_terms == 4
    assert RobustnessScore.from_results([R("ES", 0.1, 0.5, None, None)]).value is None
    assert math.isclose(RobustnessScore.from_results([R("QA+", 0.1, 10, 40, "+")]).value, 0.25)


def test_report_layout_and_json(full_run):
    report = Report.from_results(full_run, checkpoint="runs/x/checkpoints/last.ckpt", title="x/last")
    data = json.loads(report.to_json())
    row = next(r for r in data["results"] if r["attack"] == "CA+" and r["w"] == 2)
    assert set(row) >= {"attack", "eps", "w", "mean", "std", "T", "wall_s", "clean", "hparams"}
    assert row["hparams"]["steps"] == 10 and row["T"] == 24
    qa = next(r for r in data["results"] if r["attack"] == "QA+")
    assert qa["m"] == 1 and qa["sp_rank"] is not None
    assert data["suite"]["attacks"][0] == {"attack": "CA+", "epsilons": [0.1], "w": [1, 2], "steps": 10}
    assert data["checkpoint"] == "runs/x/checkpoints/last.ckpt" and data["seed"] == 0 and data["world_size"] == 1
    assert {"torch", "pytorch_lightning", "project_commit"} <= set(data["versions"])
    markdown = report.to_markdown()
    assert "| ε | CA+ w=1 | 2 | CA- w=1 | QA+ m=1 | QA- m=1 |" in markdown
    assert f"| 0.1 | {full_run.find('CA+', 0.1, 1).mean:.1f} | {full_run.find('CA+', 0.1, 2).mean:.1f} |" in markdown
    assert "| ε | ES |" in markdown and f"robustness score {full_run.score.value:.3f}" in markdown
    assert "clean R@1 = " in markdown
    side_by_side = Report.comparison_markdown([report, report])
    assert "| **x/last**, R@1 = " in side_by_side and "| **x/last (2)**, R@1 = " in side_by_side
    assert side_by_side.count("| 0 | ") == 3  # a clean row per block in the rank table, one in the SP table


class _QueryDatabaseProbe(MaxShiftAttack):
    """A query / database attack stand-in that records what the engine hands it."""

    seen: list = []

    def __call__(self, model, gallery, images, sample_indices, *, query_labels=None):
        out = super().__call__(model, gallery, images, sample_indices)
        _QueryDatabaseProbe.seen.append((len(gallery), query_labels.clone(), sample_indices.clone()))
        # "AP" stand-in: the fraction of the database sharing the query's label.
        same = (gallery.labels[None, :] == query_labels[:, None]).double().mean(1)
        out.metrics.update({"ap": same, "ap_clean": same})
        return out


def test_query_database_attacks_run_on_the_split_and_are_skipped_without_it(tiny_ranker):
    from robust_ranking.data import SyntheticDataModule

    registry = AttackRegistry(list(ATTACKS))
    registry.register("QD-probe", lambda eps, size, seed, **o: _QueryDatabaseProbe(eps, seed=seed, steps=2),
                      metric="ap", metrics=("ap", "ap_clean", "shift"), clean_metric="ap_clean",
                      protocol="query_database")
    suite = make_suite([{"attack": "QD-probe", "epsilons": [0.1]}, {"attack": "ES", "epsilons": [0.1], "steps": 2}],
                       num_samples=6, batch_size=4, registry=registry)
    evaluator = RobustnessEvaluator(suite, registry=registry, progress=False)

    without = evaluator.run(tiny_ranker.model, tiny_ranker.datamodule.eval_set)
    assert [r.attack for r in without.results] == ["ES"]
    assert without.skipped[0].attack == "QD-probe" and "query / database" in without.skipped[0].reason

    dm = SyntheticDataModule(test_per_class=25, protocol="query_database", num_queries=20, database="test_rest")
    dm.setup()
    _QueryDatabaseProbe.seen.clear()
    results = evaluator.run(tiny_ranker.model, dm.eval_set, query_set=dm.query_set, database_set=dm.database_set)
    assert [r.attack for r in results.results] == ["ES", "QD-probe"]
    probe = results.find("QD-probe", 0.1)
    assert probe.count == 6 and probe.metric == "ap"
    # The probe saw the database (80 items), the attacked queries' own labels, query-set indices.
    sizes, labels, indices = zip(*_QueryDatabaseProbe.seen)
    assert set(sizes) == {len(dm.database_set)}
    indices, labels = torch.cat(indices), torch.cat(labels)
    assert torch.equal(labels, dm.query_set.labels[indices])
    assert set(indices.tolist()) == set(evaluator.attacked_indices(len(dm.query_set)).tolist())
    attacked_labels = dm.query_set.labels[evaluator.attacked_indices(len(dm.query_set))]
    expected = (dm.database_set.labels[None, :] == attacked_labels[:, None]).double().mean(1).mean()
    assert probe.mean == pytest.approx(float(expected), abs=1e-12)
