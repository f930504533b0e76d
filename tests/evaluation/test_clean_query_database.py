"""The reports' ``clean_query_database`` section (every query against the database, computed once per
report by ``engine.clean_query_database_metrics``): equal to a brute-force recomputation on a tiny
DCH (SDHA Table 1's metrics), a tiny DPQN (SDC / ADC mAP, mAP@1000) and a metric ranker; rank 0 only
under (thread) DDP; in the JSON and Markdown report; and ``scripts/sdha_clean_map.py`` prints SDHA
Table 1 from such reports."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys

import pytest
import torch
from pytorch_metric_learning.distances import DotProductSimilarity
from pytorch_metric_learning.losses import TripletMarginLoss

from robust_ranking.data import SyntheticDataModule
from robust_ranking.evaluation import Report, RobustnessEvaluator, Suite
from robust_ranking.lightning_modules import DCHLoss, DCHRanker, DPQNRanker, LeNet
from run_helpers import on_thread_ranks, REPO, fit_with_adam


# One cheap attack: the section does not depend on the suite (ES runs on every ranker family).
SUITE = {"name": "clean-qd-test", "num_samples": 2, "seed": 0, "batch_size": 2,
         "sanity": False,
         "attacks": [{"attack": "ES", "epsilons": [0.01], "steps": 1}]}


def split_data(num_queries: int = 12, database: str = "train") -> SyntheticDataModule:
    dm = SyntheticDataModule(protocol="query_database", num_queries=num_queries, test_per_class=8,
                             train_per_class=16, database=database, eval_batch_size=32, seed=0)
    dm.setup()
    return dm


def trained(model, dm):
    torch.manual_seed(0)
    fit_with_adam(model, dm, 2)
    return model.eval()


@pytest.fixture(scope="module")
def dch():
    dm = split_data()
    torch.manual_seed(0)
    return trained(DCHRanker(LeNet(embedding_dim=16), DCHLoss(), hash_bits=16), dm), dm


@pytest.fixture(scope="module")
def dpqn():
    dm = split_data(database="test_rest")
    torch.manual_seed(0)
    model = DPQNRanker(LeNet(embedding_dim=16), TripletMarginLoss(margin=0.8, distance=DotProductSimilarity()),
                       num_bits=8, num_codebooks=2, alpha=10.0)
    return trained(model, dm), dm


def evaluate(model, dm, collectives=None, suite=SUITE, split=True):
    torch.set_num_threads(1)
    evaluator = RobustnessEvaluator(Suite.from_dict(suite), progress=False)
    return evaluator.run(model, dm.eval_set, collectives=collectives, embed_batch_size=32,
                         query_set=dm.query_set if split else None, database_set=dm.database_set if split else None)


def tensors(dataset):
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    return images, labels


def brute_ap(distances: torch.Tensor, relevant: torch.Tensor, topk: int | None = None, ball: float | None = None):
    """Per-query AP by a plain loop: stable ranking, cut at ``topk`` / inside the Hamming ``ball``."""
    out = []
    for d, rel in zip(distances.tolist(), relevant.tolist()):
        order = sorted(range(len(d)), key=lambda j: (d[j], j))
        if topk is not None:
            order = order[:topk]
        if ball is not None:
            order = [j for j in order if d[j] <= ball]
        hits, total = 0, 0.0
        for rank, j in enumerate(order, 1):
            if rel[j]:
                hits += 1
                total += hits / rank
        out.append(total / hits if hits else 0.0)
    return sum(out) / len(out)


def test_dch_section_is_sdha_table_1_brute_force(dch):
    model, dm = dch
    section = evaluate(model, dm).clean_query_database
    q_images, q_labels = tensors(dm.query_set)
    db_images, db_labels = tensors(dm.database_set)
    with torch.no_grad():
        q, db = model.encode(q_images), model.encode(db_images)
    d = (16 - q @ db.T) / 2  # Hamming distance of {-1, 1} codes
    rel = q_labels[:, None] == db_labels[None, :]
    assert section["family"] == "hashing" and section["bits"] == 16
    assert (section["queries"], section["database"]) == (12, len(dm.database_set)) == (12, 64)
    assert section["map"] == pytest.approx(brute_ap(d, rel), abs=1e-6)
    assert section["map@1000"] == pytest.approx(brute_ap(d, rel, topk=1000), abs=1e-6)  # 1000 > |database|
    assert section["map@H<=2"] == pytest.approx(brute_ap(d, rel, ball=2), abs=1e-6)
    inside = d <= 2
    precision = torch.where(inside.sum(1) > 0, (inside & rel).sum(1) / inside.sum(1).clamp_min(1), 0.0)
    assert section["precision@H<=2"] == pytest.approx(float(precision.mean()), abs=1e-6)
    assert len(section["pr_radius_precision"]) == len(section["pr_radius_recall"]) == 17
    assert 0.5 < section["map"] <= 1.0  # not vacuous: the tiny DCH has learnt the classes


def test_the_cut_off_ranks_the_first_k(dch, dpqn, monkeypatch):
    """mAP@1000 with a database of more than 1000 items is AP over the first 1000 (here: k = 10 < 64)."""
    from robust_ranking.evaluation import engine

    monkeypatch.setattr(engine, "QUERY_DATABASE_TOPK", 10)
    for model, dm in (dch, dpqn):
        section = evaluate(model, dm).clean_query_database
        q_images, q_labels = tensors(dm.query_set)
        db_images, db_labels = tensors(dm.database_set)
        with torch.no_grad():
            d = model.code_distance(model.encode(q_images), model.encode(db_images))
        key = "map@10" if section["family"] == "hashing" else "sdc_map@10"
        expected = brute_ap(d, q_labels[:, None] == db_labels[None, :], topk=10)
        assert section[key] == pytest.approx(expected, abs=1e-6) and expected != pytest.approx(section[key[:-3]])


def test_dch_section_through_the_faiss_index_is_the_same(dch, monkeypatch):
    from robust_ranking.retrieval import index as index_module

    model, dm = dch
    torch_path = evaluate(model, dm).clean_query_database
    monkeypatch.setattr(index_module, "FAISS_MIN_GALLERY", 0)  # HammingIndex for the ranking metrics
    assert evaluate(model, dm).clean_query_database == torch_path


def test_dpqn_section_is_sdc_adc_brute_force_and_the_pq_ag_clean_ap(dpqn):
    model, dm = dpqn
    n = len(dm.query_set)
    suite = {**SUITE, "num_samples": n, "batch_size": 4,  # every query attacked: its clean AP covers them all
             "attacks": [{"attack": "PQ-AG:Basic", "epsilons": [0.01], "alpha": 0.01, "steps": 1}]}
    results = evaluate(model, dm, suite=suite)
    section = results.clean_query_database
    q_images, q_labels = tensors(dm.query_set)
    db_images, db_labels = tensors(dm.database_set)
    with torch.no_grad():
        q_codes, q_features, db_codes = model.encode(q_images), model.embed(q_images), model.encode(db_images)
    rel = q_labels[:, None] == db_labels[None, :]
    assert section["family"] == "product_quantization" and section["bits"] == 8
    assert (section["queries"], section["database"]) == (n, len(dm.database_set))
    for mode, d in (("sdc", model.sdc_distance(q_codes, db_codes)), ("adc", model.adc_distance(q_features, db_codes))):
        assert section[f"{mode}_map"] == pytest.approx(brute_ap(d, rel), abs=1e-6), mode
        assert section[f"{mode}_map@1000"] == pytest.approx(brute_ap(d, rel, topk=1000), abs=1e-6), mode
    # the PQ-AG rows' clean values (whole ranking, every query) are the same mAPs
    row = results.find("PQ-AG:Basic", 0.01)
    assert row.count == n
    assert row.clean == pytest.approx(section["sdc_map"], abs=1e-6)
    assert row.extra["ap_adc_clean"] == pytest.approx(section["adc_map"], abs=1e-6)


def test_metric_ranker_section_is_recall_and_map(tiny_ranker):
    dm = split_data(database="test_rest")
    model = tiny_ranker.model
    section = evaluate(model, dm).clean_query_database
    q_images, q_labels = tensors(dm.query_set)
    db_images, db_labels = tensors(dm.database_set)
    with torch.no_grad():
        d = model.distance(model.embed(q_images), model.embed(db_images))
    rel = q_labels[:, None] == db_labels[None, :]
    assert section["family"] == "metric" and "bits" not in section
    assert section["map"] == pytest.approx(brute_ap(d, rel), abs=1e-6)
    top1 = rel[torch.arange(len(d)), d.argmin(1)].float().mean()
    assert section["recall@1"] == pytest.approx(float(top1))
    assert set(section) == {"family", "queries", "database", "recall@1", "map", "map@r"}


def test_no_section_without_a_split_or_without_clean_metrics(dch):
    model, dm = dch
    assert evaluate(model, dm, split=False).clean_query_database is None
    evaluator = RobustnessEvaluator(Suite.from_dict(SUITE), progress=False, clean_metrics=False)
    results = evaluator.run(model, dm.eval_set, embed_batch_size=32, query_set=dm.query_set,
                            database_set=dm.database_set)
    assert results.clean_query_database is None and results.database is None  # no database pass for nothing
    assert "clean_query_database" not in Report.from_results(results, include_environment=False).data


def test_world_size_two_rank_zero_has_the_single_process_section(dch):
    model, dm = dch
    single = evaluate(model, dm).clean_query_database
    outputs = on_thread_ranks(lambda collectives: evaluate(copy.deepcopy(model), dm, collectives))
    assert outputs[0].clean_query_database == single and outputs[1].clean_query_database is None


def load_reader(monkeypatch):
    """``scripts/sdha_clean_map.py`` imported by file path (a reader: no sibling imports)."""
    spec = importlib.util.spec_from_file_location("sdha_clean_map", REPO / "scripts" / "sdha_clean_map.py")
    loaded = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "sdha_clean_map", loaded)
    spec.loader.exec_module(loaded)
    return loaded


def test_report_and_reader_print_sdha_table_1(dch, dpqn, tmp_path, monkeypatch, capsys):
    model, dm = dch
    results = evaluate(model, dm)
    report = Report.from_results(results, checkpoint="runs/dch_16/last.ckpt", include_environment=False)
    section = report.data["clean_query_database"]
    assert section == results.clean_query_database
    markdown = report.to_markdown()
    assert "Clean query / database retrieval (12 queries against 64 database items, Hamming ranking, 16 bits)" \
        in markdown and f"mAP@1000 = {100 * section['map@1000']:.1f}%" in markdown
    path = tmp_path / "dch.json"
    report.write(path, figures=False)
    pq = Report.from_results(evaluate(*dpqn), include_environment=False)
    assert "SDC mAP@1000 = " in pq.to_markdown()
    pq_path = tmp_path / "dpqn.json"
    pq.write(pq_path, figures=False)

    reader = load_reader(monkeypatch)
    out_json = tmp_path / "table1.json"
    rows = reader.main([str(path), str(pq_path), "--json", str(out_json)])  # the PQ report is not a hashing one
    printed = capsys.readouterr()
    assert len(rows) == 1 and rows[0]["bits"] == 16 and rows[0]["map@1000"] == section["map@1000"]
    assert (f"| 16 | {section['map@1000']:.4f} | {section['map']:.4f} | {section['map@H<=2']:.4f} | "
            f"{section['precision@H<=2']:.4f} | 12 x 64 | runs/dch_16/last.ckpt |") in printed.out
    assert "no hashing clean_query_database" in printed.err
    assert json.loads(out_json.read_text()) == rows
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"results": [], "clean": {"map": 0.5}}))
    with pytest.raises(SystemExit, match="no report with a hashing clean_query_database"):
        reader.main([str(bare)])


def test_metric_ranker_in_the_report_markdown(tiny_ranker):
    dm = split_data(database="test_rest")
    text = Report.from_results(evaluate(tiny_ranker.model, dm), include_environment=False).to_markdown()
    assert "ranked by the codes): R@1 = " in text and "MAP@R = " in text

