"""The RobRank ERS attacks (TMA, ES:R, LTM, GTM, GTT) on the tiny ranker: direction, budget, targets,
agreement with ES, the engine, and world size 2 == 1 (ranks simulated by threads)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from robust_ranking.attacks import Gallery, MaxShiftAttack
from robust_ranking.attacks.ranking import (
    EmbeddingShiftRecallAttack,
    GreedyTop1MisrankAttack,
    GreedyTop1TranslocationAttack,
    LearningToMisrankAttack,
    TargetedMismatchAttack,
)
from robust_ranking.attacks.ranking.top1 import recall_at_1, stable_position
from robust_ranking.evaluation import ATTACKS, RobustnessEvaluator, Suite
from robust_ranking.evaluation.report import Report
from robust_ranking.evaluation.tensorboard import scalar_values
from run_helpers import on_thread_ranks, REPO

EPS, ALPHA, STEPS = 0.1, 0.01, 20

#: attack class -> (metric, clean metric, +1 if an effective attack raises the metric, -1 if it lowers it)
ATTACK_METRICS = {
    TargetedMismatchAttack: ("cos", "cos_clean", +1),
    EmbeddingShiftRecallAttack: ("recall@1", "recall@1_clean", -1),
    LearningToMisrankAttack: ("recall@1", "recall@1_clean", -1),
    GreedyTop1MisrankAttack: ("recall@1", "recall@1_clean", -1),
    GreedyTop1TranslocationAttack: ("retain@4", "retain@4_clean", -1),
}


@pytest.fixture(scope="module")
def setup(tiny_ranker):
    model, dataset = tiny_ranker.model, tiny_ranker.datamodule.eval_set
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    with torch.no_grad():
        gallery = Gallery(model.embed(x), y)
    idx = torch.arange(0, len(x), 7)  # 15 queries of |X| = 100
    return model, x, gallery, idx


def _distances(model, x, gallery):
    with torch.no_grad():
        return model.distance(model.embed(x)[:, None, :], gallery.embeddings).squeeze(1)


@pytest.mark.parametrize("cls", list(ATTACK_METRICS), ids=lambda c: c.name)
def test_moves_its_metric_and_respects_budget_and_box(setup, cls):
    model, x, gallery, idx = setup
    metric, clean_metric, sign = ATTACK_METRICS[cls]
    result = cls(EPS, alpha=ALPHA, steps=STEPS)(model, gallery, x[idx], idx)
    adv, clean = result.metrics[metric], result.metrics[clean_metric]
    assert adv.shape == clean.shape == (len(idx),)
    gain = sign * float(adv.mean() - clean.mean())
    assert gain > (0.3 if metric == "cos" else 40.0), (cls.name, float(clean.mean()), float(adv.mean()))
    assert float(result.perturbation.abs().max()) <= EPS + 1e-6
    assert float(result.adversarial.min()) >= 0.0 and float(result.adversarial.max()) <= 1.0
    assert torch.equal(result.perturbation, result.adversarial - x[idx])


@pytest.mark.parametrize("cls", list(ATTACK_METRICS), ids=lambda c: c.name)
def test_eps_zero_changes_nothing(setup, cls):
    model, x, gallery, idx = setup
    metric, clean_metric, _ = ATTACK_METRICS[cls]
    result = cls(0.0)(model, gallery, x[idx], idx)
    assert torch.equal(result.adversarial, x[idx])
    assert torch.equal(result.metrics[metric], result.metrics[clean_metric])


def test_es_r_measures_the_es_attacks_adversarial_queries(setup):
    model, x, gallery, idx = setup
    es = MaxShiftAttack(EPS, alpha=ALPHA, steps=STEPS)(model, gallery, x[idx], idx)
    es_r = EmbeddingShiftRecallAttack(EPS, alpha=ALPHA, steps=STEPS)(model, gallery, x[idx], idx)
    assert torch.equal(es.adversarial, es_r.adversarial)
    assert torch.equal(es.metrics["shift"], es_r.metrics["shift"])


def test_recall_at_1_and_positions_against_a_sort(setup):
    model, x, gallery, idx = setup
    d = _distances(model, x[idx] * 0.7 + 0.1, gallery)  # some queries whose top-1 is wrong
    got = recall_at_1(d, idx, gallery.labels)
    target = torch.tensor([(i * 13) % 100 for i in range(len(idx))])
    target = torch.where(target == idx, (target + 1) % 100, target)
    positions = stable_position(d, idx, target)
    for b, q in enumerate(idx.tolist()):
        order = [j for j in sorted(range(100), key=lambda j: (float(d[b, j]), j)) if j != q]
        assert float(got[b]) == (100.0 if int(gallery.labels[order[0]]) == int(gallery.labels[q]) else 0.0)
        assert int(positions[b]) == order.index(int(target[b]))


def test_targets_follow_the_definitions(setup):
    model, x, gallery, idx = setup
    labels = gallery.labels
    d = _distances(model, x[idx], gallery)
    # TMA: one random other gallery item per query, keyed by the query's index (same in any batch)
    tma = TargetedMismatchAttack(0.0)(model, gallery, x[idx], idx)
    assert (tma.targets[:, 0] != idx).all()
    alone = TargetedMismatchAttack(0.0)(model, gallery, x[idx[3:4]], idx[3:4])
    assert int(alone.targets[0, 0]) == int(tma.targets[3, 0])
    cos = F.cosine_similarity(model.embed(x[idx]), gallery.embeddings[tma.targets[:, 0]], dim=-1)
    assert torch.allclose(tma.metrics["cos_clean"], cos.detach(), atol=1e-6)
    # GTM: u = nearest item of another label than the clean top-1's; GTT: t1 = the clean top-1
    gtm = GreedyTop1MisrankAttack(0.0)(model, gallery, x[idx], idx)
    gtt = GreedyTop1TranslocationAttack(0.0)(model, gallery, x[idx], idx)
    for b, q in enumerate(idx.tolist()):
        order = [j for j in sorted(range(100), key=lambda j: (float(d[b, j]), j)) if j != q]
        top1 = order[0]
        unmatching = next(j for j in order if int(labels[j]) != int(labels[top1]))
        assert gtm.targets[b].tolist() == [top1, unmatching]
        assert int(gtt.targets[b, 0]) == top1
    assert (gtt.metrics["retain@4_clean"] == 100.0).all() and (gtt.metrics["retain@1_clean"] == 100.0).all()


def test_ltm_loss_is_the_mis_ranking_triplet(setup, monkeypatch):
    """The loss PGD minimizes equals [max_neg d - min_pos d]_+ computed by a loop (self excluded)."""
    model, x, gallery, idx = setup
    captured = {}

    def capture(self, loss_fn, images, sample_indices, delta0=None):
        captured["loss"] = loss_fn(images).detach()
        return images

    monkeypatch.setattr(LearningToMisrankAttack, "pgd", capture)
    LearningToMisrankAttack(EPS)(model, gallery, x[idx], idx)
    d = _distances(model, x[idx], gallery)
    for b, q in enumerate(idx.tolist()):
        pos = [float(d[b, j]) for j in range(100) if j != q and gallery.labels[j] == gallery.labels[q]]
        neg = [float(d[b, j]) for j in range(100) if gallery.labels[j] != gallery.labels[q]]
        assert float(captured["loss"][b]) == pytest.approx(max(0.0, max(neg) - min(pos)), abs=1e-6)


def test_registered_for_suites():
    for name, metric in (("TMA", "cos"), ("ES:R", "recall@1"), ("LTM", "recall@1"), ("GTM", "recall@1"),
                         ("GTT", "retain@4")):
        entry = ATTACKS.get(name)
        assert entry.metric == metric and entry.direction is None and entry.size_key is None
        attack = entry.build(77 / 255, None, 5, alpha=3 / 255, steps=32)
        assert (attack.name, attack.eps, attack.alpha, attack.steps, attack.seed) == (name, 77 / 255, 3 / 255, 32, 5)
    for name in ("robrank_ers_28", "robrank_ers_224"):
        suite = Suite.from_yaml(REPO / "configs" / "suites" / f"{name}.yaml")
        assert [s.attack for s in suite.attacks] == ["CA+", "CA-", "QA+", "QA-", "TMA", "ES", "ES:R", "LTM", "GTM",
                                                     "GTT"]
        eps = 77 / 255 if name.endswith("28") else 8 / 255
        for spec in suite.attacks:
            assert spec.epsilons == (pytest.approx(eps),) and spec.options["steps"] == 32
            assert spec.options["alpha"] == pytest.approx(3 / 255) and spec.sizes in ((1,), ())


# --------------------------------------------------------------------------- through the engine
ERS_SUITE = {
    "name": "ers_test", "num_samples": 12, "seed": 0, "batch_size": 5, "sanity": False,
    "attacks": [
        {"attack": a, "epsilons": [EPS], "alpha": ALPHA, "steps": 10, **extra}
        for a, extra in (("CA+", {"w": [1]}), ("CA-", {"w": [1]}), ("QA+", {"m": [1], "G": 0}),
                         ("QA-", {"m": [1], "G": 0}), ("TMA", {}), ("ES", {}), ("ES:R", {}), ("LTM", {}),
                         ("GTM", {}), ("GTT", {}))
    ],
}


def evaluate(tiny_ranker, model=None, collectives=None):
    torch.set_num_threads(1)  # also in the rank threads below: the OpenMP thread count is per thread
    evaluator = RobustnessEvaluator(Suite.from_dict(ERS_SUITE), progress=False)
    return evaluator.run(model or tiny_ranker.model, tiny_ranker.datamodule.eval_set, collectives=collectives)


@pytest.fixture(scope="module")
def single(tiny_ranker):
    return evaluate(tiny_ranker)


def test_engine_runs_all_ten_and_reports_ers(single):
    by_name = {r.attack: r for r in single.results}
    assert list(by_name) == [a["attack"] for a in ERS_SUITE["attacks"]]
    assert by_name["ES:R"].extra["shift"] == by_name["ES"].mean  # the same adversarial queries
    for name in ("ES:R", "LTM", "GTM", "GTT"):
        assert by_name[name].mean < by_name[name].clean, name
    assert by_name["TMA"].mean > by_name["TMA"].clean
    report = Report.from_results(single, include_environment=False)
    ers = report.data["ers"]
    assert ers["value"] is not None and ers["missing"] == [] and len(ers["terms"]) == 10
    assert ers["value"] == pytest.approx(sum(ers["terms"].values()) / 10)
    assert report.data["robustness_score"] == single.score.value  # the score is unchanged beside it
    assert "**ERS " in report.to_markdown()
    assert scalar_values(single)["robust/ers"] == pytest.approx(ers["value"])


def test_world_size_two_gives_the_single_process_numbers(tiny_ranker, single):
    outputs = on_thread_ranks(lambda collectives: evaluate(tiny_ranker, copy.deepcopy(tiny_ranker.model), collectives))
    for rank in (0, 1):
        assert outputs[rank].world_size == 2
        for a, b in zip(single.results, outputs[rank].results, strict=True):
            assert (a.attack, a.mean, a.std, a.clean, a.count) == (b.attack, b.mean, b.std, b.clean, b.count), rank
            assert dict(a.extra) == dict(b.extra), rank
