"""Golden numbers: every suite family's results on tiny seeded models, fixed before refactors.

A refactor of the evaluation engine must leave every number bit-identical. The expected values in
``tests/golden/*.json`` were produced by the engine before the refactor; the tests compare them
EXACTLY (no tolerance; NaN equals NaN, ``1`` is not ``1.0``):

- ``ranking.json``: CA+ / CA- / QA+ / QA- / ES on the tiny ranker of ``conftest.py`` (fixed before the
  trust work of issue 13; the one test that calls the engine directly, so its imports follow the engine's
  modules when they move; ``ranking_eval.json``'s test checks the same numbers through ``eval.py``);
- ``ranking_eval.json``: the same suite and ranker through ``eval.py`` (the ranker saved as a run:
  checkpoint + ``config.yaml``): the whole report, sanity checks and diagnostics included; the test
  also checks that it holds the numbers of ``ranking.json``;
- ``pqag.json``: PQ-AG Basic / APD / AOD (``configs/suites/pqag_table.yaml``'s shape) on a tiny DPQN;
- ``hashing.json``: SDHA, SDHA-UW, HAG, SDHA-T, SDHA-UW-T, DHTA (``sdha_quick.yaml``'s shape) on a tiny DCH;
- ``sdha_tables.json``: the per-iteration AP / l2 traces of the six hashing attacks on the same DCH
  (untargeted, and targeted with the binary search of alpha), as ``eval.py`` gathers them (a suite with
  ``traces: true``) and ``scripts/sdha_tables.py`` reads them (fixed when that script ran the attacks);
- ``universal.json``: I-CA+ / I-CA- / I-QA+ / I-QA- (``universal_eccv2020*.yaml``'s shapes, per-sample
  and shared targets) on a tiny metric ranker;
- ``uap.json``: UAP-IR label / pair / list (``uap_retrieval*.yaml``'s shapes: no resizing, a resize
  range, the ablation's options) on the same ranker;
- ``transfer.json``: ``eval.py --source A B --ckpt A B`` (a 2 x 2 matrix per attack) on two tiny rankers;
- ``ers.json``: RobRank's ten ERS attacks (``robrank_ers_28.yaml``'s shape) and the ERS on the metric ranker
  (fixed when the ERS attacks were added, issue 16).

Everything goes through stable entry points only: ``eval.main``, ``train.py`` (``run_helpers.train_in``)
and ``scripts/sdha_tables.py``'s ``load_results`` (imported by file path); the tiny models are trained
once per module. A golden file is the report with the fields that differ from run to run removed (:data:`VOLATILE`: wall times,
dates, versions, paths, fingerprints, TensorBoard folders); every number stays. The comparison
(:func:`assert_matches`) requires every leaf of the golden file, and every list length, to be
identical in the new report; a report may gain fields.

The numbers hold for one intra-op thread (``conftest.py`` sets it for every test; the trainings here
set it too): with two threads both training and evaluation round differently in the last bits (and a
transfer rank moves), so they are a property of this setting, not a tolerance to relax.

If a change is *meant* to alter numbers, regenerate with
``python -m pytest tests/evaluation/test_golden_numbers.py -k regenerate --regenerate-golden all``
(or name some: ``--regenerate-golden pqag,transfer``) and say why in the
commit. Regeneration computes every family twice, from fresh trainings, and refuses to write
numbers that are not reproducible; the tests themselves only compare.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from run_helpers import REPO

GOLDEN = REPO / "tests" / "golden"

# --------------------------------------------------------------------------- suites
RANKING_SUITE = {
    "name": "golden-ranking", "num_samples": 20, "seed": 3, "batch_size": 8,
    "attacks": [
        {"attack": "CA+", "epsilons": [0.03, 0.1], "w": [1, 2], "steps": 4},
        {"attack": "CA-", "epsilons": [0.1], "w": [1], "steps": 4},
        {"attack": "QA+", "epsilons": [0.1], "m": [1, 2], "steps": 4},
        {"attack": "QA-", "epsilons": [0.1], "m": [1], "steps": 4},
        {"attack": "ES", "epsilons": [0.1], "steps": 4},
    ],
}

# RANKING_SUITE for eval.py: with its large-budget sanity checks, fewer of them and shorter than the
# defaults (which would triple the cost); they do not change the suite's results.
RANKING_EVAL_SUITE = {**RANKING_SUITE, "sanity": {"num_samples": 10, "steps": 50, "alpha": 0.02}}

# configs/suites/pqag_table.yaml, shrunk (tests/evaluation/test_pqag_ddp.py): T = 15 (a ragged last batch of 4),
# eps 0.1 so that the attacks change codes on the far-apart synthetic classes.
PQAG_SUITE = """
name: golden-pqag
num_samples: 15
seed: 0
batch_size: 4
attacks:
  - {attack: "PQ-AG:Basic", epsilons: [0.1], alpha: 0.01, steps: 5, random_start: true}
  - {attack: "PQ-AG:APD", epsilons: [0.1], alpha: 0.01, steps: 5, random_start: true}
  - {attack: "PQ-AG:AOD", epsilons: [0.1], alpha: 0.01, steps: 5, random_start: true}
"""

# configs/suites/sdha_quick.yaml, shrunk (tests/evaluation/test_sdha_ddp.py): T = 13, a ragged last batch of 4.
HASHING_SUITE = """
name: golden-hashing
num_samples: 13
seed: 0
batch_size: 4
attacks:
  - {attack: SDHA, epsilons: [0.3], steps: 12, check_every: 4, lagrange: 100, topk: 16}
  - {attack: SDHA-UW, epsilons: [0.3], steps: 12, check_every: 4, lagrange: 100, topk: 16}
  - {attack: HAG, epsilons: [0.3], steps: 12, check_every: 4, topk: 16}
  - {attack: SDHA-T, epsilons: [0.3], steps: 12, check_every: 4, lagrange: 100, topk: 16, target_label: random}
  - {attack: SDHA-UW-T, epsilons: [0.3], steps: 12, check_every: 4, lagrange: 100, topk: 16, target_label: random}
  - {attack: DHTA, epsilons: [0.3], steps: 12, check_every: 4, alpha: 0.01, topk: 16, target_label: random}
"""

# configs/suites/robrank_ers_28.yaml, shrunk: RobRank's ten ERS attacks (QA without the SP term), T = 12 in
# batches of 5 (a ragged last batch of 2), 4 PGD steps; the report carries ERS beside the score.
ERS_SUITE = """
name: golden-ers
num_samples: 12
seed: 0
batch_size: 5
attacks:
  - {attack: CA+, epsilons: [0.1], w: [1], steps: 4}
  - {attack: CA-, epsilons: [0.1], w: [1], steps: 4}
  - {attack: QA+, epsilons: [0.1], m: [1], G: 0, steps: 4}
  - {attack: QA-, epsilons: [0.1], m: [1], G: 0, steps: 4}
  - {attack: TMA, epsilons: [0.1], steps: 4}
  - {attack: ES, epsilons: [0.1], steps: 4}
  - {attack: ES:R, epsilons: [0.1], steps: 4}
  - {attack: LTM, epsilons: [0.1], steps: 4}
  - {attack: GTM, epsilons: [0.1], steps: 4}
  - {attack: GTT, epsilons: [0.1], steps: 4}
"""

# The SDHA tables' traces (configs/suites/sdha_tables_*.yaml's shape, traces: true), as
# scripts/sdha_tables.py ran them before the engine gathered traces: the untargeted attacks, then
# the targeted ones with two runs of SDHA's binary search of alpha and success at AP 0.5; 4 queries
# in batches of 2, 10 iterations, a check every 5, AP@10.
SDHA_TABLES_SUITE = """
name: golden-sdha-tables
num_samples: 4
seed: 0
batch_size: 2
traces: true
attacks:
  - {attack: SDHA, epsilons: [0.3], steps: 10, check_every: 5, topk: 10, lagrange: 100}
  - {attack: SDHA-UW, epsilons: [0.3], steps: 10, check_every: 5, topk: 10, lagrange: 100}
  - {attack: HAG, epsilons: [0.3], steps: 10, check_every: 5, topk: 10, lr: 500}
  - {attack: SDHA-T, epsilons: [0.3], steps: 10, check_every: 5, topk: 10, lagrange: 100, target_label: random, search_steps: 2, goal_ap: 0.5}
  - {attack: SDHA-UW-T, epsilons: [0.3], steps: 10, check_every: 5, topk: 10, lagrange: 100, target_label: random, search_steps: 2, goal_ap: 0.5}
  - {attack: DHTA, epsilons: [0.3], steps: 10, check_every: 5, topk: 10, lr: 0.00392156862745098, target_label: random, goal_ap: 0.5}
"""

# universal_eccv2020.yaml (+ _eps: two epsilons, + _shared: one shared target set), shrunk: a fit set
# of 8 in batches of 4, 2 epochs.
UNIVERSAL_SUITE = """
name: golden-universal
kind: universal
num_samples: 8
seed: 0
batch_size: 4
attacks:
  - {attack: I-CA+, epsilons: [0.03, 0.3], w: [1], epochs: 2}
  - {attack: I-CA-, epsilons: [0.3], w: [1], epochs: 2}
  - {attack: I-QA+, epsilons: [0.3], m: [1], epochs: 2, xi: 0}
  - {attack: I-QA-, epsilons: [0.3], m: [1], epochs: 2, xi: 0}
  - {attack: I-CA+, epsilons: [0.3], w: [1], epochs: 2, shared_targets: true}
  - {attack: I-QA+, epsilons: [0.3], m: [1], epochs: 2, xi: 0, shared_targets: true}
"""

# uap_retrieval.yaml (no resizing / a resize range, eval_scales), uap_retrieval_ablation.yaml (negative,
# num_clusters, ndcg_k) and uap_retrieval_list_sharp.yaml (tau), shrunk: a fit set of 8, 2 epochs.
UAP_SUITE = """
name: golden-uap
kind: universal
num_samples: 8
seed: 0
batch_size: 4
attacks:
  - {attack: "UAP-IR:label", epsilons: [0.1], epochs: 2, resize_range: null, input_size: [28, 28], eval_scales: [0.5, 1.0, 1.5]}
  - {attack: "UAP-IR:pair", epsilons: [0.1], epochs: 2, resize_range: null, input_size: [28, 28], eval_scales: [0.5, 1.0, 1.5]}
  - {attack: "UAP-IR:list", epsilons: [0.1], epochs: 2, resize_range: null, input_size: [28, 28], eval_scales: [0.5, 1.0, 1.5]}
  - {attack: "UAP-IR:label", epsilons: [0.1], epochs: 2, resize_range: [0.75, 1.25], input_size: [28, 28], eval_scales: [0.5, 1.0, 1.5]}
  - {attack: "UAP-IR:pair", epsilons: [0.1], epochs: 2, resize_range: [0.75, 1.25], input_size: [28, 28], eval_scales: [0.5, 1.0, 1.5]}
  - {attack: "UAP-IR:list", epsilons: [0.1], epochs: 2, resize_range: [0.5, 1.5], input_size: [28, 28], tau: 0.001, eval_scales: [0.5, 1.0, 1.5]}
  - {attack: "UAP-IR:pair", epsilons: [0.1], epochs: 2, input_size: [28, 28], negative: nearest, num_clusters: 4}
  - {attack: "UAP-IR:list", epsilons: [0.1], epochs: 2, input_size: [28, 28], ndcg_k: 20}
"""

# transfer_eccv2020.yaml's four attacks (QA+ xi 1, QA- xi 100), shrunk: T = 10 in batches of 5, 3 steps.
TRANSFER_SUITE = """
name: golden-transfer
num_samples: 10
seed: 0
batch_size: 5
attacks:
  - {attack: CA+, epsilons: [0.1], w: [1], steps: 3}
  - {attack: CA-, epsilons: [0.1], w: [1], steps: 3}
  - {attack: QA+, epsilons: [0.1], m: [1], steps: 3, xi: 1}
  - {attack: QA-, epsilons: [0.1], m: [2], steps: 3, xi: 100}
"""

# --------------------------------------------------------------------------- tiny models
# The tiny ranker of conftest.py as an eval.py run: its state dict and the config that rebuilds it.
RANKER_RUN_CONFIG = """
model:
  class_path: robust_ranking.lightning_modules.MetricRanker
  init_args:
    backbone: {class_path: robust_ranking.lightning_modules.LeNet, init_args: {embedding_dim: 16}}
    loss:
      class_path: pytorch_metric_learning.losses.TripletMarginLoss
      init_args:
        margin: 0.2
        distance: {class_path: pytorch_metric_learning.distances.CosineSimilarity}
data:
  class_path: robust_ranking.data.SyntheticDataModule
  init_args: {test_per_class: 25, eval_batch_size: 64, seed: 0}
"""

# tests/cli/test_eval_transfer.py's metric rankers (LeNet seed 0, C2F1 seed 1), 1 epoch on synthetic data.
METRIC_CONFIG = """
seed_everything: {seed}
trainer:
  max_epochs: 1
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
  logger:
    class_path: pytorch_lightning.loggers.TensorBoardLogger
    init_args: {{save_dir: runs, name: {name}}}
model:
  class_path: robust_ranking.lightning_modules.MetricRanker
  init_args:
    backbone:
      class_path: robust_ranking.lightning_modules.{backbone}
      init_args: {{embedding_dim: 16}}
    loss:
      class_path: pytorch_metric_learning.losses.TripletMarginLoss
      init_args:
        margin: 0.2
        distance: {{class_path: pytorch_metric_learning.distances.CosineSimilarity}}
data:
  class_path: robust_ranking.data.SyntheticDataModule
  init_args: {{test_per_class: 25, eval_batch_size: 64}}
"""

# The training configs of the hashing rankers as they were when the golden numbers were fixed
# (configs/fashion_mnist_dch_16.yaml and configs/fashion_mnist_dpqn_24bit.yaml at commit bce2aeb), copied
# here so that a reorganization of configs/ cannot move the numbers; the tiny settings are the
# command-line overrides of train_dch / train_dpqn (as tests/evaluation/test_sdha_ddp.py / test_pqag_ddp.py pass them).
DCH_CONFIG = """
seed_everything: 0
trainer:
  max_epochs: 5
  accelerator: auto
  devices: 1
  precision: 32-true
  use_distributed_sampler: false
  log_every_n_steps: 50
  logger:
    class_path: pytorch_lightning.loggers.TensorBoardLogger
    init_args:
      save_dir: runs
      name: fashion_mnist_dch_16
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args:
        monitor: val/map
        mode: max
        save_last: true
        filename: "epoch{epoch:02d}-map_{val/map:.4f}"
        auto_insert_metric_name: false
    - class_path: pytorch_lightning.callbacks.LearningRateMonitor
      init_args:
        logging_interval: epoch
model:
  class_path: robust_ranking.lightning_modules.DCHRanker
  init_args:
    backbone:
      class_path: robust_ranking.lightning_modules.C2F1
      init_args:
        in_channels: 1
        embedding_dim: 1024
    loss:
      class_path: robust_ranking.lightning_modules.DCHLoss
      init_args:
        gamma: 20.0
        quantization_weight: 0.1
    hash_bits: 16
    optimizer:
      class_path: torch.optim.Adam
      init_args:
        lr: 0.001
    lr_scheduler:
      class_path: torch.optim.lr_scheduler.CosineAnnealingLR
      init_args:
        T_max: 5
data:
  class_path: robust_ranking.data.FashionMNISTDataModule
  init_args:
    batch_size: 128
    samples_per_class: 16
    eval_batch_size: 1000
    protocol: query_database
    num_queries: 1000
    database: train
"""

DPQN_CONFIG = """
seed_everything: 0
trainer:
  max_epochs: 3
  accelerator: auto
  devices: 1
  precision: 32-true
  use_distributed_sampler: false
  log_every_n_steps: 50
  logger:
    class_path: pytorch_lightning.loggers.TensorBoardLogger
    init_args:
      save_dir: runs
      name: fashion_mnist_dpqn_24bit
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args:
        monitor: val/adc_map
        mode: max
        save_last: true
        filename: "epoch{epoch:02d}-adcmap_{val/adc_map:.4f}"
        auto_insert_metric_name: false
    - class_path: pytorch_lightning.callbacks.LearningRateMonitor
      init_args:
        logging_interval: epoch
model:
  class_path: robust_ranking.lightning_modules.DPQNRanker
  init_args:
    backbone:
      class_path: robust_ranking.lightning_modules.C2F1
      init_args:
        in_channels: 1
        embedding_dim: 128
    loss:
      class_path: pytorch_metric_learning.losses.TripletMarginLoss
      init_args:
        margin: 0.8
        distance:
          class_path: pytorch_metric_learning.distances.DotProductSimilarity
    num_bits: 24
    num_codebooks: 4
    alpha: 10.0
    optimizer:
      class_path: torch.optim.Adam
      init_args:
        lr: 0.001
    lr_scheduler:
      class_path: torch.optim.lr_scheduler.CosineAnnealingLR
      init_args:
        T_max: 3
data:
  class_path: robust_ranking.data.FashionMNISTDataModule
  init_args:
    batch_size: 128
    samples_per_class: 16
    eval_batch_size: 1000
    protocol: query_database
    num_queries: 1000
    database: test_rest
    seed: 0
"""

TINY_TRAINER = ["--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1"]
# A query / database split of synthetic data: 24 queries, the other 40 test images the database.
TINY_SPLIT = ["--data", "robust_ranking.data.SyntheticDataModule", "--data.batch_size", "16", "--data.samples_per_class", "4",
              "--data.test_per_class", "16", "--data.eval_batch_size", "64", "--data.protocol", "query_database",
              "--data.num_queries", "24", "--data.database", "test_rest"]


def _train(root: Path, name: str, argv: list[str]) -> Path:
    """``train.py <argv>`` in ``root`` on one intra-op thread (as every golden number was computed);
    the run's ``last.ckpt``, else its only checkpoint."""
    import torch

    from run_helpers import train_in

    torch.set_num_threads(1)  # module fixtures run before conftest's per-test reset
    train_in(root, argv)
    folder = root / "runs" / name / "version_0" / "checkpoints"
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    (ckpt,) = folder.glob("*.ckpt")
    return ckpt


def train_dpqn(root: Path) -> Path:
    """DPQN_CONFIG (fashion_mnist_dpqn_24bit.yaml) shrunk: LeNet(16-d), 16 bits (M = 4, K = 16), 1 epoch."""
    (root / "dpqn.yaml").write_text(DPQN_CONFIG)
    return _train(root, "tiny_dpqn", [
        "fit", "--config", str(root / "dpqn.yaml"), *TINY_TRAINER,
        "--trainer.logger.init_args.name", "tiny_dpqn", "--model.init_args.backbone", "robust_ranking.lightning_modules.LeNet",
        "--model.init_args.backbone.init_args.embedding_dim", "16", "--model.init_args.num_bits", "16", *TINY_SPLIT])


def train_dch(root: Path) -> Path:
    """DCH_CONFIG (fashion_mnist_dch_16.yaml) shrunk: LeNet(32-d), 16 bits, 1 epoch."""
    (root / "dch.yaml").write_text(DCH_CONFIG)
    return _train(root, "tiny_dch", [
        "fit", "--config", str(root / "dch.yaml"), *TINY_TRAINER,
        "--trainer.logger.init_args.name", "tiny_dch", "--model.init_args.backbone", "robust_ranking.lightning_modules.LeNet",
        "--model.init_args.backbone.init_args.embedding_dim", "32", *TINY_SPLIT])


def train_metric(root: Path) -> dict[str, Path]:
    """Two metric rankers on the same synthetic X: LeNet (seed 0) and C2F1 (seed 1), 1 epoch each."""
    out = {}
    for name, backbone, seed in (("tiny_a", "LeNet", 0), ("tiny_b", "C2F1", 1)):
        (root / f"{name}.yaml").write_text(METRIC_CONFIG.format(seed=seed, name=name, backbone=backbone))
        out[name] = _train(root, name, ["fit", "--config", str(root / f"{name}.yaml")])
    return out


def save_ranker_run(tiny: Any, root: Path) -> Path:
    """``tiny`` (conftest.TinyRanker) as a run eval.py loads: ``<run>/checkpoints/last.ckpt`` + ``config.yaml``."""
    import torch

    run = root / "tiny_ranker" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(RANKER_RUN_CONFIG)
    torch.save({"state_dict": tiny.model.state_dict()}, run / "checkpoints" / "last.ckpt")
    return run / "checkpoints" / "last.ckpt"


# --------------------------------------------------------------------------- reports -> golden numbers
#: Fields that differ from run to run (or name paths): removed at any depth.
VOLATILE = frozenset({"wall_s", "embed_wall_s", "created", "versions", "meta", "fingerprint", "checkpoint",
                      "suite_file", "tensorboard", "seconds", "ckpt"})


def strip(data: Any) -> Any:
    """``data`` without the :data:`VOLATILE` fields; transfer's ``sources`` / ``targets`` keep only the names."""
    if isinstance(data, dict):
        return {k: (list(v) if k in ("sources", "targets") and isinstance(v, dict) else strip(v))
                for k, v in data.items() if k not in VOLATILE}
    if isinstance(data, list):
        return [strip(v) for v in data]
    return data


def _leaves(data: Any, path: str = "") -> dict[str, str]:
    """``{path: exact repr}`` of every leaf; lists also give their length (``path.len``)."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for k, v in data.items():
            out.update(_leaves(v, f"{path}.{k}" if path else str(k)))
        return out
    if isinstance(data, list):
        out = {f"{path}.len": str(len(data))}
        for i, v in enumerate(data):
            out.update(_leaves(v, f"{path}[{i}]"))
        return out
    return {path: f"{type(data).__name__}:{data!r}"}  # float repr is exact; nan == nan; 1 != 1.0


def assert_matches(actual: Any, golden_name: str) -> None:
    """Every leaf (and list length) of ``tests/golden/<golden_name>.json`` is identical in ``actual``."""
    expected = _leaves(json.loads((GOLDEN / f"{golden_name}.json").read_text()))
    got = _leaves(json.loads(json.dumps(actual)))
    diffs = [f"{p}: expected {v}, got {got.get(p, '<missing>')}" for p, v in expected.items() if got.get(p) != v]
    assert not diffs, f"{len(diffs)} of {len(expected)} golden values of {golden_name}.json differ:\n" + "\n".join(
        diffs[:40])


def _eval(argv: list[str]) -> list[Any]:
    from robust_ranking.cli import eval as eval_script

    return eval_script.main([*argv, "--accelerator", "cpu", "--no-progress"])


def _suite(root: Path, text: str) -> Path:
    path = root / f"suite{len(list(root.glob('suite*.yaml')))}.yaml"
    path.write_text(text)
    return path


def ranking_numbers(tiny) -> dict:
    """Every reduced number of the golden ranking suite (as floats' exact reprs, via JSON), from the engine."""
    from robust_ranking.evaluation.engine import RobustnessEvaluator
    from robust_ranking.evaluation.suite import Suite

    suite = Suite.from_dict(RANKING_SUITE)
    results = RobustnessEvaluator(suite, progress=False).run(tiny.model, tiny.datamodule.eval_set)
    rows = [{"attack": r.attack, "eps": r.eps, "size": r.size, "mean": r.mean, "std": r.std, "count": r.count,
             "clean": r.clean, "extra": dict(r.extra)} for r in results.results]
    return {"results": rows, "clean": results.clean, "score": results.score.value,
            "per_attack": results.score.per_attack, "attacked": results.attacked_indices}


def ranking_eval_report(ckpt: Path, root: Path) -> dict[str, Any]:
    """The golden ranking suite through ``eval.py`` (sanity checks included): the stripped report."""
    import yaml

    suite = _suite(root, yaml.safe_dump(RANKING_EVAL_SUITE, sort_keys=False))
    out = root / "ranking_out"
    _eval(["--ckpt", str(ckpt), "--suite", str(suite), "--output-dir", str(out)])
    return strip(json.loads((out / f"{ckpt.stem}.{RANKING_SUITE['name']}.json").read_text()))


def ranking_eval_as_engine_numbers(report: dict[str, Any]) -> dict[str, Any]:
    """The ``ranking.json`` view of an eval.py report of :data:`RANKING_SUITE`."""
    plain = {"attack", "eps", "size_key", "metric", "mean", "std", "T", "clean", "direction", "hparams", "invalid",
             "diagnostics", "spec_index"}
    rows = []
    for r in report["results"]:
        key = r["size_key"]
        rows.append({"attack": r["attack"], "eps": r["eps"], "size": r[key] if key else None, "mean": r["mean"],
                     "std": r["std"], "count": r["T"], "clean": r["clean"],
                     "extra": {k: v for k, v in r.items() if k not in plain and k != key}})
    return {"results": rows, "clean": report["clean"], "score": report["robustness_score"],
            "per_attack": report["score_per_attack"], "attacked": report["attacked_indices"]}


def suite_report(ckpt: Path, root: Path, suite_text: str, name: str) -> dict[str, Any]:
    """One ranking / universal suite through ``eval.py`` on ``ckpt``: the stripped JSON report."""
    out = root / f"{name}_out"
    _eval(["--ckpt", str(ckpt), "--suite", str(_suite(root, suite_text)), "--output-dir", str(out)])
    return strip(json.loads((out / f"{ckpt.stem}.{name}.json").read_text()))


def load_script(name: str) -> Any:
    """``scripts/<name>.py`` as a module, imported by file path (no ``sys.path`` edit)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sdha_tables_results(ckpt: Path, root: Path) -> dict[str, Any]:
    """:data:`SDHA_TABLES_SUITE` through ``eval.py`` (traces in the report), read back by
    ``scripts/sdha_tables.py``: its merged results (traces included)."""
    out = root / "sdha_tables_out"
    _eval(["--ckpt", str(ckpt), "--suite", str(_suite(root, SDHA_TABLES_SUITE)), "--output-dir", str(out)])
    report = out / f"{ckpt.stem}.golden-sdha-tables.json"
    return strip(load_script("sdha_tables").load_results([report]))


def transfer_report(ckpts: dict[str, Path], root: Path) -> dict[str, Any]:
    a, b = str(ckpts["tiny_a"]), str(ckpts["tiny_b"])
    out = root / "transfer_out"
    _eval(["--source", a, b, "--ckpt", a, b, "--suite", str(_suite(root, TRANSFER_SUITE)), "--output-dir", str(out)])
    return strip(json.loads((out / "transfer_golden-transfer.json").read_text()))


# --------------------------------------------------------------------------- what each golden file holds
def _families(tiny_ranker: Callable[[], Any]) -> dict[str, Callable[[Path], dict[str, Any]]]:
    """``{golden name: numbers(root)}`` for the generator; each trains its own models under ``root``."""

    def ranking_eval(root: Path) -> dict[str, Any]:
        return ranking_eval_report(save_ranker_run(tiny_ranker(), root), root)

    def hashing(root: Path) -> dict[str, Any]:
        return suite_report(train_dch(root), root, HASHING_SUITE, "golden-hashing")

    def tables(root: Path) -> dict[str, Any]:
        return sdha_tables_results(train_dch(root), root)

    return {
        "ranking_eval": ranking_eval,
        "pqag": lambda root: suite_report(train_dpqn(root), root, PQAG_SUITE, "golden-pqag"),
        "hashing": hashing,
        "sdha_tables": tables,
        "universal": lambda root: suite_report(train_metric(root)["tiny_a"], root, UNIVERSAL_SUITE,
                                               "golden-universal"),
        "uap": lambda root: suite_report(train_metric(root)["tiny_a"], root, UAP_SUITE, "golden-uap"),
        "transfer": lambda root: transfer_report(train_metric(root), root),
        "ers": lambda root: suite_report(train_metric(root)["tiny_a"], root, ERS_SUITE, "golden-ers"),
    }


# --------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def dpqn_ckpt(tmp_path_factory) -> Path:
    return train_dpqn(tmp_path_factory.mktemp("golden_dpqn"))


@pytest.fixture(scope="module")
def dch_ckpt(tmp_path_factory) -> Path:
    return train_dch(tmp_path_factory.mktemp("golden_dch"))


@pytest.fixture(scope="module")
def metric_ckpts(tmp_path_factory) -> dict[str, Path]:
    return train_metric(tmp_path_factory.mktemp("golden_metric"))


def test_ranking_suite_numbers_are_unchanged(tiny_ranker):
    expected = json.loads((GOLDEN / "ranking.json").read_text())
    assert json.loads(json.dumps(ranking_numbers(tiny_ranker))) == expected


def test_ranking_suite_through_eval_py(tiny_ranker, tmp_path):
    report = ranking_eval_report(save_ranker_run(tiny_ranker, tmp_path), tmp_path)
    # eval.py gives the engine's numbers of ranking.json, and its whole report is unchanged
    assert json.loads(json.dumps(ranking_eval_as_engine_numbers(report))) == json.loads(
        (GOLDEN / "ranking.json").read_text())
    assert_matches(report, "ranking_eval")


def test_pqag_suite_numbers_are_unchanged(dpqn_ckpt, tmp_path):
    report = suite_report(dpqn_ckpt, tmp_path, PQAG_SUITE, "golden-pqag")
    assert [r["attack"] for r in report["results"]] == ["PQ-AG:Basic", "PQ-AG:APD", "PQ-AG:AOD"]
    assert_matches(report, "pqag")


def test_hashing_suite_numbers_are_unchanged(dch_ckpt, tmp_path):
    report = suite_report(dch_ckpt, tmp_path, HASHING_SUITE, "golden-hashing")
    assert [r["attack"] for r in report["results"] if r["metric"] == "ap"] == [
        "SDHA", "SDHA-UW", "HAG", "SDHA-T", "SDHA-UW-T", "DHTA"]
    assert_matches(report, "hashing")


def test_sdha_tables_traces_are_unchanged(dch_ckpt, tmp_path):
    results = sdha_tables_results(dch_ckpt, tmp_path)
    assert set(results["16"]) == {"SDHA", "SDHA-UW", "HAG", "SDHA-T", "SDHA-UW-T", "DHTA"}
    assert_matches(results, "sdha_tables")


def test_universal_suite_numbers_are_unchanged(metric_ckpts, tmp_path):
    assert_matches(suite_report(metric_ckpts["tiny_a"], tmp_path, UNIVERSAL_SUITE, "golden-universal"), "universal")


def test_uap_suite_numbers_are_unchanged(metric_ckpts, tmp_path):
    assert_matches(suite_report(metric_ckpts["tiny_a"], tmp_path, UAP_SUITE, "golden-uap"), "uap")


def test_ers_suite_numbers_are_unchanged(metric_ckpts, tmp_path):
    report = suite_report(metric_ckpts["tiny_a"], tmp_path, ERS_SUITE, "golden-ers")
    assert [r["attack"] for r in report["results"]] == [
        "CA+", "CA-", "QA+", "QA-", "TMA", "ES", "ES:R", "LTM", "GTM", "GTT"]
    assert report["ers"]["value"] is not None and len(report["ers"]["terms"]) == 10
    assert_matches(report, "ers")


def test_transfer_numbers_are_unchanged(metric_ckpts, tmp_path):
    assert_matches(transfer_report(metric_ckpts, tmp_path), "transfer")


# --------------------------------------------------------------------------- regeneration
def _regenerate(names: list[str]) -> None:
    """Compute each family twice (fresh trainings in fresh folders); write it only if both agree."""
    import torch

    from run_helpers import train_tiny_ranker

    torch.set_num_threads(1)
    families = _families(train_tiny_ranker)
    unknown = set(names) - {"ranking", *families}
    if unknown:
        raise SystemExit(f"unknown golden files {sorted(unknown)}; known: ranking, {', '.join(families)}")
    failed = []
    if not names or "ranking" in names:
        first, second = (json.loads(json.dumps(ranking_numbers(train_tiny_ranker()))) for _ in range(2))
        if _leaves(first) != _leaves(second):
            failed.append("ranking")
        else:
            (GOLDEN / "ranking.json").write_text(json.dumps(first, indent=1) + "\n")
            print(f"wrote {GOLDEN / 'ranking.json'}")
    for name, numbers in families.items():
        if names and name not in names:
            continue
        runs, start = [], time.perf_counter()
        for _ in range(2):
            with tempfile.TemporaryDirectory(prefix=f"golden_{name}_") as root:
                runs.append(json.loads(json.dumps(numbers(Path(root)))))
        print(f"{name}: {time.perf_counter() - start:.1f} s for two runs", file=sys.stderr)
        first, second = (_leaves(r) for r in runs)
        if first != second:
            diffs = [p for p in first if first[p] != second.get(p)]
            print(f"NOT REPRODUCIBLE: {name}: {len(diffs)} values differ between two runs, e.g. {diffs[:10]}",
                  file=sys.stderr)
            failed.append(name)
            continue
        (GOLDEN / f"{name}.json").write_text(json.dumps(runs[0], indent=1, allow_nan=True) + "\n")
        print(f"wrote {GOLDEN / f'{name}.json'}")
    if failed:
        raise SystemExit(f"not written (not reproducible run to run): {', '.join(failed)}")


def test_regenerate_golden_files(request: pytest.FixtureRequest) -> None:
    """``--regenerate-golden NAMES`` (comma-separated, or ``all``) rewrites those golden files; without
    the option this does nothing (only when a change is meant to alter the numbers)."""
    names = request.config.getoption("--regenerate-golden")
    if names is None:
        pytest.skip("pass --regenerate-golden <names|all> to rewrite tests/golden/*.json")
    _regenerate([] if names == "all" else [n for n in names.split(",") if n])
