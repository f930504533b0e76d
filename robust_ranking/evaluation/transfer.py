"""The transfer runner (ECCV 2020 Table 5): adversarial examples crafted white-box on each source
checkpoint, measured on every target checkpoint; a source x target matrix per configuration.

Every model embeds the same gallery X once; every target number is computed with the target's own
model (the adversarial images from the source are embedded by the target and ranked against the
target's embedding of X). PQ-AG entries (query / database protocol, AAAI 2020 Tables 3 / 4) attack the
suite's T queries of the query set instead and measure SDC / ADC mAP against each target's own database
codes (:func:`attacks.quantization.pq_transfer.pq_transfer_attack`; every model a PQ ranker). Outputs
``transfer_<suite-name>.json`` / ``.md``; ``.partial.json`` / ``.md``
hold the finished matrices while it runs.

One process or DDP (``collectives``; ``eval.py --devices N`` runs it through
:func:`evaluation.launch.run_distributed`): the T attacked samples are split by whole attack batches
(rank r crafts batches r, r + W, ... on each source), the adversarial images are gathered back in
sample order, and every embedding pass is split by batches too (:func:`attacks.transfer.transfer_attack`):
every forward has its one-process shape, so the matrices equal world size 1's bit for bit. Rank 0
writes the reports.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from robust_ranking.attacks.ranking.candidate_attack import CandidateAttack
from robust_ranking.attacks.gallery import Gallery
from robust_ranking.attacks.quantization.pq_ag_attack import PQAGAttack
from robust_ranking.attacks.quantization.pq_transfer import dataset_tensors, encode_database, pq_transfer_attack
from robust_ranking.attacks.ranking.query_attack import QueryAttack
from robust_ranking.attacks.transfer import embed_all, transfer_attack, transfer_markdown
from robust_ranking.data import RetrievalDataModule
from robust_ranking.evaluation.checkpoints import instantiate, load_ranker, run_config, run_dir
from robust_ranking.evaluation.data import check_embeddings, check_images, encode_all, gallery_tensors
from robust_ranking.evaluation.engine import EvaluationInterrupted, RobustnessEvaluator, clean_metrics
from robust_ranking.evaluation.errors import EvaluationError, one_line
from robust_ranking.evaluation.launch import stop_vote
from robust_ranking.evaluation.options import BenchmarkOptions, load_suite
from robust_ranking.evaluation.registry import ATTACKS
from robust_ranking.evaluation.report import nan_mean, run_metadata, write_outputs
from robust_ranking.evaluation.suite import SuiteError

__all__ = ["TransferPlan", "evaluate_transfer", "model_names", "prepare_transfer", "transfer_report_markdown"]


@dataclass
class TransferPlan:
    """Everything a transfer run needs, loaded and validated."""

    suite: Any
    models: dict[str, Any]  # name -> model, every source and target once
    ckpts: dict[str, str]
    sources: list[str]
    targets: list[str]
    datamodule: Any
    json_path: Path
    md_path: Path


def model_names(paths: list[Path]) -> list[str]:
    """Short unique names: the experiment (``runs/<name>/version_N``), then name/version, then + stem, then the path."""
    def experiment(p: Path) -> str:
        run = run_dir(p)
        return run.parent.name if run.name.startswith("version_") and run.parent.name else run.name

    for name_of in (experiment, lambda p: f"{experiment(p)}/{run_dir(p).name}" if run_dir(p).name != experiment(p)
                    else experiment(p), lambda p: f"{experiment(p)}/{run_dir(p).name}/{p.stem}", str):
        names = [name_of(p) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def prepare_transfer(sources: Sequence[str | Path], targets: Sequence[str | Path],
                     options: BenchmarkOptions) -> TransferPlan:
    """Validate a transfer run and load every model and the shared gallery X; raise :class:`EvaluationError`.

    ``sources``: the checkpoints the attacks are crafted on; ``targets``: those they are measured on.
    """
    paths = list(dict.fromkeys(Path(p) for p in [*sources, *targets]))  # each model loaded once
    for ckpt in paths:
        if not ckpt.is_file():
            raise EvaluationError(f"checkpoint {ckpt} does not exist")
    if options.devices < 1:
        raise EvaluationError(f"--devices must be >= 1, got {options.devices}")
    if options.accelerator == "gpu":
        available = torch.cuda.device_count()
        if available < options.devices:
            raise EvaluationError(f"--accelerator gpu --devices {options.devices}: {available} GPU(s) visible")
    suite = load_suite(options)
    if options.gallery_size is not None and options.gallery_size < 2:
        raise EvaluationError(f"--gallery-size must be >= 2, got {options.gallery_size}")
    if suite.kind != "ranking":
        raise EvaluationError(f"--source: {options.suite} is a {suite.kind} suite; transfer takes per-sample CA / QA attacks "
                        "(e.g. configs/suites/transfer_eccv2020.yaml)")
    for config in suite.configurations():
        attack = ATTACKS.get(config.attack).build(config.eps, config.size, suite.seed, **config.options)
        if not isinstance(attack, (CandidateAttack, QueryAttack, PQAGAttack)):
            raise EvaluationError(f"--source: {config.attack} cannot be transferred (transfer measures the normalized rank "
                            "of CA / QA attacks, or the SDC / ADC mAP of PQ-AG queries, on the targets); remove it "
                            "from the suite")
    data_config = Path(options.data_config) if options.data_config else None
    if data_config is not None and not data_config.is_file():
        raise EvaluationError(f"--data-config {data_config} does not exist")
    names = model_names(paths)
    models, ckpts, data_sections = {}, {}, {}
    for name, ckpt in zip(names, paths):
        model_section, data_section, where = run_config(ckpt, data_config)
        models[name], ckpts[name] = load_ranker(ckpt, model_section, where), str(ckpt)
        if data_section is not None:
            data_sections[name] = (data_section, where)
    if not data_sections:
        raise EvaluationError("no data config: none of the checkpoints has a run config.yaml with a 'data' section; "
                        "pass --data-config")
    # Transfer compares models on ONE gallery X: every run must have been trained / evaluated on the same data.
    classes = {sec.get("class_path") for sec, _ in data_sections.values()}
    if len(classes) > 1:
        raise EvaluationError(f"the checkpoints use different data modules ({', '.join(sorted(map(str, classes)))}); "
                        "transfer needs one gallery X: pass --data-config")
    section, where = next(iter(data_sections.values()))
    datamodule = instantiate(section, RetrievalDataModule, "data", where)
    try:
        datamodule.setup("test")
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise EvaluationError(f"{where}: cannot load the data ({one_line(err)[:300]})") from None
    n = len(datamodule.eval_set)
    if options.gallery_size is not None and options.gallery_size > n:
        raise EvaluationError(f"--gallery-size {options.gallery_size} is larger than X ({n} items)")
    try:
        suite.check_gallery(n if options.gallery_size is None else options.gallery_size)
    except SuiteError as err:
        raise EvaluationError(str(err)) from None
    _check_query_database(suite, models, datamodule)
    source_names = [names[paths.index(Path(p))] for p in dict.fromkeys(sources)]
    target_names = [names[paths.index(Path(p))] for p in dict.fromkeys(targets)]
    out_dir = Path(options.output_dir) if options.output_dir else run_dir(Path(sources[0])) / "robustness"
    stem = f"transfer_{suite.name}"
    return TransferPlan(suite, models, ckpts, source_names, target_names, datamodule, out_dir / f"{stem}.json",
                        out_dir / f"{stem}.md")


def evaluate_transfer(plan: TransferPlan, options: BenchmarkOptions, *, collectives: Any = None,
                      device: torch.device | str | None = None) -> dict[str, Any] | None:
    """Every configuration of the suite: craft on each source, measure on each target (ECCV 2020 Table 5).

    ``collectives``: split the work over the ranks of a DDP run (every rank calls this with the same
    arguments); ``device``: this rank's device (default ``options.device``). Returns the report's
    data on rank 0, ``None`` on the other ranks.
    """
    with torch.inference_mode(False), torch.enable_grad():  # the attacks differentiate (Lightning tests in no-grad)
        return _evaluate_transfer(plan, options, collectives, options.device if device is None else device)


def _evaluate_transfer(plan: TransferPlan, options: BenchmarkOptions, collectives: Any,
                       device: torch.device | str) -> dict[str, Any] | None:
    start = time.perf_counter()
    suite = plan.suite
    main = collectives is None or int(collectives.rank) == 0
    progress = options.progress and main
    images, labels = gallery_tensors(plan.datamodule)
    subset = None
    if options.gallery_size is not None and options.gallery_size < images.shape[0]:
        # A seeded subset of X (stream seed + 1, independent of the attacked-sample draw) is the gallery
        # of every model: the same protocol at a fraction of the cost of embedding X with each model.
        generator = torch.Generator().manual_seed(suite.seed + 1)
        subset = torch.randperm(images.shape[0], generator=generator)[: options.gallery_size].sort().values
        images, labels = images[subset], labels[subset]
    images, labels = images.to(device), labels.to(device)
    models = {name: model.to(device) for name, model in plan.models.items()}
    # Each model embeds X once; every attack, source and target reuses it.
    check_images(images, "the gallery")
    galleries = {name: Gallery(embed_all(model, images, suite.batch_size, collectives), labels)
                 for name, model in models.items()}
    for name, gallery in galleries.items():
        check_embeddings(gallery.embeddings, plan.ckpts[name])
    clean = {name: clean_metrics(models[name], gallery.embeddings, labels,
                                 encode_all(models[name], images, suite.batch_size))
             for name, gallery in galleries.items()} if main else {}  # the reports' clean metrics: rank 0
    embed_wall = time.perf_counter() - start
    n = images.shape[0]
    indices = RobustnessEvaluator(suite, progress=False).attacked_indices(n)  # the engine's T samples
    targets = {name: models[name] for name in plan.targets}
    split = None  # PQ-AG (query / database protocol): the query set and every model's database codes, once
    if _query_database_configs(suite):
        queries, query_labels = dataset_tensors(plan.datamodule.query_set)
        db_images, db_labels = dataset_tensors(plan.datamodule.database_set)
        queries, query_labels, db_images = queries.to(device), query_labels.to(device), db_images.to(device)
        check_images(queries, "the query set")
        check_images(db_images, "the database")
        databases = {name: encode_database(model, db_images, db_labels, suite.batch_size, collectives)
                     for name, model in models.items()}
        split = (queries, query_labels, databases,
                 RobustnessEvaluator(suite, progress=False).attacked_indices(len(query_labels)))
    results = []
    total = len(list(suite.configurations()))
    for config in suite.configurations():
        if stop_vote(collectives, options.should_stop, device):  # between configurations (partial matrices on disk)
            err = EvaluationInterrupted(results, total)
            if results and main:
                err.partial = plan.json_path.with_name(f"{plan.json_path.stem}.partial.json")
            raise err
        attack = ATTACKS.get(config.attack).build(config.eps, config.size, suite.seed, **config.options)
        row: dict[str, Any] = {"attack": config.attack, "eps": config.eps, "hparams": attack.hparams,
                               "matrix": {}, "wall_s": {}}
        if config.size_key:
            row[config.size_key] = config.size
        for src in plan.sources:
            t0 = time.perf_counter()
            if isinstance(attack, PQAGAttack):  # adversarial queries, measured against each target's database
                queries, query_labels, databases, query_indices = split
                res = pq_transfer_attack(models[src], targets, attack, queries, query_labels, query_indices,
                                         databases, databases[src], suite.batch_size, progress=progress,
                                         collectives=collectives)
                row["matrix"][src] = _pq_cells(res, plan.targets)
                row["num_queries"] = int(query_indices.numel())
            else:
                res = transfer_attack(models[src], targets, attack, images, labels, indices, suite.batch_size,
                                      source_gallery=galleries[src], target_galleries=galleries,
                                      progress=progress, collectives=collectives)
                row["matrix"][src] = {
                    tgt: {"rank_clean": nan_mean(res.rank_clean[tgt]), "rank": nan_mean(res.rank[tgt]),
                          "rank_std": float(res.rank[tgt].double().std()) if len(indices) > 1 else 0.0}
                    for tgt in plan.targets}
            row["wall_s"][src] = time.perf_counter() - t0
            if progress:
                print(f"{config.label} from {src}: "
                      + ", ".join(f"{t} {_cell(v)[0]:.1f}->{_cell(v)[1]:.1f}" for t, v in row["matrix"][src].items())
                      + f" ({row['wall_s'][src]:.0f} s)", file=sys.stderr)
        results.append(row)
        if main and len(results) < len(list(suite.configurations())):  # progress: the finished matrices so far
            partial = {"format": "robust-ranking/transfer-report/v1", "partial": True,
                       **run_metadata(suite, device), "sources": {s: plan.ckpts[s] for s in plan.sources},
                       "targets": {t: plan.ckpts[t] for t in plan.targets}, "clean": clean, "gallery_size": n,
                       "num_samples": int(indices.numel()), "results": results,
                       "wall_s": time.perf_counter() - start}
            stem = plan.json_path.stem
            write_outputs(plan.json_path.with_name(f"{stem}.partial.json"),
                           plan.md_path.with_name(f"{stem}.partial.md"), partial, transfer_report_markdown(partial))
    if not main:
        return None
    world_size = 1 if collectives is None else int(collectives.world_size)
    data = {"format": "robust-ranking/transfer-report/v1", **run_metadata(suite, device), "world_size": world_size,
            "sources": {s: plan.ckpts[s] for s in plan.sources}, "targets": {t: plan.ckpts[t] for t in plan.targets},
            "clean": clean,
            "gallery_size": n, "gallery_subset": None if subset is None else subset.tolist(),
            "num_samples": int(indices.numel()), "attacked_indices": indices.tolist(),
            "results": results, "embed_wall_s": embed_wall, "wall_s": time.perf_counter() - start}
    written = write_outputs(plan.json_path, plan.md_path, data, transfer_report_markdown(data))
    plan.json_path.with_name(f"{plan.json_path.stem}.partial.json").unlink(missing_ok=True)
    plan.md_path.with_name(f"{plan.md_path.stem}.partial.md").unlink(missing_ok=True)
    return written


def transfer_report_markdown(data: dict[str, Any]) -> str:
    """One "From \\ To" matrix per configuration (ECCV 2020 Table 5 layout), cells clean→adversarial."""
    lines = [f"# Transfer attacks ({data['suite']['name']})", "",
             "Rows: source model (adversarial examples crafted white-box on it); columns: target model "
             "(the same adversarial images, ranked by the target against its own embedding of X). Cells: mean "
             f"normalized rank (%) clean→adversarial, T = {data['num_samples']} of |X| = {data['gallery_size']}"
             f"{' (a seeded subset of X)' if data.get('gallery_subset') else ''}. "
             "The diagonal is the white-box attack. PQ-AG rows (AAAI 2020 Tables 3 / 4): the attacked queries of "
             "the query set, cells SDC mAP x 100 clean→adversarial against each target's database codes (the "
             "report also holds ADC).", ""]
    for row in data["results"]:
        size = next((f" {k}={row[k]}" for k in ("w", "m") if k in row), "")
        matrix = {src: {tgt: _cell(v) for tgt, v in cells.items()}
                  for src, cells in row["matrix"].items()}
        wall = sum(row["wall_s"].values())
        lines.append(transfer_markdown(matrix, f"{row['attack']} transfer, ε = {row['eps']:g}{size} ({wall:.0f} s)"))
    lines += ["Models (clean R@1 / mAP on X): " + ", ".join(
        f"{k} = `{v}` ({data['clean'][k]['recall@1']:.4f} / {data['clean'][k]['map']:.4f})"
        for k, v in {**data["sources"], **data["targets"]}.items()), ""]
    return "\n".join(lines)


def _query_database_configs(suite: Any) -> list[Any]:
    """The suite's configurations of the query / database protocol (PQ-AG: AAAI 2020 Tables 3 / 4)."""
    return [c for c in suite.configurations() if ATTACKS.get(c.attack).protocol == "query_database"]


def _check_query_database(suite: Any, models: dict[str, Any], datamodule: Any) -> None:
    """PQ-AG transfer needs PQ rankers (SDC / ADC) and a query / database split; raise :class:`EvaluationError`."""
    configs = _query_database_configs(suite)
    if not configs:
        return
    if datamodule.protocol != "query_database":
        raise EvaluationError(f"--source: {configs[0].attack} attacks queries against a database: the data config "
                              "needs protocol: query_database")
    lacking = [name for name, model in models.items() if "codebooks" not in getattr(model, "capabilities", ())]
    if lacking:
        raise EvaluationError(f"--source: {configs[0].attack} transfer measures SDC / ADC mAP, which needs PQ rankers "
                              f"(capability 'codebooks'); {', '.join(lacking)} has none")
    try:
        suite.check_gallery(len(datamodule.query_set))
    except SuiteError as err:
        raise EvaluationError(f"the query set: {err}") from None


def _pq_cells(res: Any, targets: list[str]) -> dict[str, dict[str, float]]:
    """Per target: the mean SDC / ADC AP (mAP) of the clean and the adversarial queries, and the std of ``ap_sdc``."""
    cells = {}
    for tgt in targets:
        cell = {}
        for mode in ("sdc", "adc"):
            cell[f"ap_{mode}_clean"] = nan_mean(res.ap_clean[tgt][f"ap_{mode}"])
            cell[f"ap_{mode}"] = nan_mean(res.ap[tgt][f"ap_{mode}"])
        values = res.ap[tgt]["ap_sdc"]
        cell["ap_sdc_std"] = float(values.double().std()) if values.numel() > 1 else 0.0
        cells[tgt] = cell
    return cells


def _cell(value: dict[str, float]) -> tuple[float, float]:
    """A matrix cell as (clean, adversarial): the normalized rank (CA / QA) or SDC mAP x 100 (PQ-AG)."""
    if "rank" in value:
        return value["rank_clean"], value["rank"]
    return 100 * value["ap_sdc_clean"], 100 * value["ap_sdc"]
