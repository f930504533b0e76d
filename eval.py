"""Robustness benchmark of checkpoints: run an attack suite, write JSON + Markdown reports.

::

    python eval.py --ckpt runs/fashion_mnist_ct/version_0/checkpoints/last.ckpt \\
                   --suite configs/suites/eccv2020_28x28.yaml
    python eval.py --ckpt A.ckpt B.ckpt --suite configs/suites/quick.yaml --devices 2 --accelerator cpu

Each checkpoint is loaded with ``lightning_modules.load_ranker`` (or, when its hyper-parameters
cannot rebuild the model, from the ``model`` section of the run's ``config.yaml`` plus the
checkpoint's state dict). The data module comes from the run's ``config.yaml`` (LightningCLI
saves it at ``<run>/config.yaml``, next to ``<run>/checkpoints/``) or from ``--data-config`` (a
LightningCLI config with a ``data`` section, or a bare ``class_path`` + ``init_args`` data
section). The suite runs through a Lightning ``Trainer.test`` with the
:class:`callbacks.RobustnessEvaluation` callback, so ``--devices N`` uses DDP exactly as during
training (gloo on CPU); the numbers do not depend on N.

Outputs: ``<run>/robustness/<ckpt-stem>.json`` and ``.md`` (or in ``--output-dir``), written
atomically at the end (a ``<ckpt-stem>.partial.json`` tracks progress meanwhile and is removed
after), so an interrupted run never replaces a finished report. With several checkpoints a
side-by-side ``comparison.md`` (ECCV 2020 Table 3 layout) goes to ``--output-dir`` or the first
checkpoint's report folder. The Markdown tables are printed.

Two more modes share the loading and the error handling:

- **universal suites** (``kind: universal``, e.g. ``configs/suites/universal_eccv2020.yaml``,
  ``configs/suites/uap_retrieval.yaml``): ``eval.py --ckpt X --suite U.yaml`` fits one
  perturbation per configuration on a fit set of X and measures it on that set and on a disjoint
  unseen set (ECCV 2020 Table 6; UAP-IR mAP / mP@10 / mDR), single process. Outputs:
  ``<ckpt-stem>.<suite-name>.json`` / ``.md`` / ``.pt`` (the perturbations) and TensorBoard
  events (perturbation images, effect curves) under ``<output-dir>/tensorboard/``.
- **transfer**: ``eval.py --source A.ckpt [B.ckpt ...] --ckpt A.ckpt B.ckpt C.ckpt --suite S.yaml``
  crafts each CA / QA configuration of the (ranking) suite white-box on every source and measures
  the same adversarial images on every target of ``--ckpt`` (ECCV 2020 Table 5): a source x
  target matrix per configuration in ``transfer_<suite-name>.json`` / ``.md``.

Every argument error (a missing checkpoint, a file that is not a Ranker checkpoint, an unknown
attack or a typo in the suite, an epsilon out of range, a w / m larger than the gallery, a bad
data config) is one line, ``eval.py: error: ...``, exit code 2, before any attack runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

__all__ = ["main"]

PROG = "eval.py"


class EvalError(Exception):
    """Bad input, reported as one line before any work starts."""


#: The signal that asked this process to stop (SIGINT / SIGTERM), or None. The engine polls it
#: before every attack batch, so a stop lands within one batch with a valid partial report.
_STOP_SIGNAL: list[int | None] = [None]
#: Exit codes: 2 bad input, 3 a report was written but has no valid score, 128 + N a signal N.
EXIT_INVALID = 3


def _request_stop(signum: int, _frame: Any) -> None:
    if _STOP_SIGNAL[0] is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop at once
        raise KeyboardInterrupt
    _STOP_SIGNAL[0] = signum


def _install_signal_handlers() -> None:
    _STOP_SIGNAL[0] = None
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _request_stop)


def _is_rank_zero() -> bool:
    """Lightning's DDP launcher re-runs this script with LOCAL_RANK / RANK set for the other ranks."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def _exit_interrupted(finished: int, total: int, partial: Path | None) -> NoReturn:
    signum = _STOP_SIGNAL[0] or signal.SIGINT
    if _is_rank_zero():
        where = f" (partial report: {partial})" if partial is not None else ""
        print(f"{PROG}: interrupted after {finished} of {total} configurations; "
              f"run the same command to resume{where}", file=sys.stderr)
    raise SystemExit(128 + int(signum))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Robustness benchmark of ranker checkpoints (attack suites).")
    parser.add_argument("--ckpt", nargs="+", required=True, metavar="CKPT",
                        help="checkpoint file(s); with --source: the target models")
    parser.add_argument("--suite", required=True,
                        help="suite YAML, e.g. configs/suites/eccv2020_28x28.yaml (a 'kind: universal' suite "
                             "fits universal perturbations)")
    parser.add_argument("--source", nargs="+", default=None, metavar="SRC",
                        help="transfer mode: craft the suite's CA / QA attacks on these checkpoints and measure "
                             "them on every --ckpt (ECCV 2020 Table 5 matrix)")
    parser.add_argument("--gallery-size", type=int, default=None, metavar="G",
                        help="transfer only: rank against a seeded random subset of G items of X instead of all "
                             "of X (every model uses the same subset; for slow models on a CPU)")
    parser.add_argument("--num-samples", type=int, default=None, metavar="T",
                        help="attacked samples T (overrides the suite; -1 = whole gallery)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="B",
                        help="attack batch size (overrides the suite)")
    parser.add_argument("--devices", type=int, default=1, metavar="N", help="processes / GPUs (N > 1: DDP)")
    parser.add_argument("--accelerator", default="auto", choices=("cpu", "gpu", "auto"),
                        help="auto: the GPU when there is one, else the CPU (DDP over gloo)")
    parser.add_argument("--data-config", default=None, metavar="YAML",
                        help="data module config (default: <run>/config.yaml of each checkpoint)")
    parser.add_argument("--output-dir", default=None, metavar="DIR",
                        help="where to write the reports (default: <run>/robustness/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute even if a finished or partial report of this checkpoint and suite exists "
                             "(the finished report is replaced only when the new one is complete)")
    parser.add_argument("--no-sanity", action="store_true",
                        help="skip the suite's large-budget sanity checks (see docs/reliability.md)")
    return parser


@dataclass
class _Job:
    """One checkpoint, ready to evaluate.

    ``fingerprint`` identifies the run (checkpoint bytes, suite, data); a partial report with the
    same fingerprint is resumed (``completed``), a finished one is reused (``finished``).
    """

    ckpt: Path
    model: Any
    datamodule: Any
    json_path: Path
    md_path: Path
    title: str
    fingerprint: dict[str, Any] | None = None
    completed: list[Any] | None = None
    finished: Any = None

    @property
    def partial_path(self) -> Path:
        return self.json_path.with_name(f"{self.json_path.stem}.partial.json")


# --------------------------------------------------------------------------- preparation
def load_suite(args: argparse.Namespace) -> Any:
    """The suite of ``--suite`` (ranking or universal) with the CLI overrides; raise :class:`EvalError`."""
    from evaluation.suite import SUITE_KINDS, Suite, SuiteError

    try:
        suite = Suite.from_yaml(args.suite, kinds=SUITE_KINDS)
        sanity = False if getattr(args, "no_sanity", False) and suite.kind == "ranking" else None
        return suite.with_overrides(num_samples=args.num_samples, batch_size=args.batch_size, sanity=sanity)
    except SuiteError as err:
        raise EvalError(str(err)) from None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def run_dir(ckpt: Path) -> Path:
    """``<run>`` of ``<run>/checkpoints/x.ckpt`` (LightningCLI layout), else the checkpoint's folder."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise EvalError(f"cannot read {what} {path}: {_one_line(err)}") from None
    if not isinstance(data, dict):
        raise EvalError(f"{what} {path} must be a YAML mapping")
    return data


Section = dict[str, Any]


def _run_config(ckpt: Path, data_config: Path | None) -> tuple[Section | None, Section | None, str]:
    """``(model section or None, data section or None, where the sections came from)``."""
    run_config_path = run_dir(ckpt) / "config.yaml"
    run_config = _read_yaml(run_config_path, "run config") if run_config_path.is_file() else None
    model_section = run_config.get("model") if run_config else None
    if data_config is not None:
        cfg = _read_yaml(data_config, "data config")
        if "data" in cfg:
            model_section = cfg.get("model") or model_section
            cfg = cfg["data"]
        if not isinstance(cfg, dict) or "class_path" not in cfg:
            raise EvalError(
                f"data config {data_config} needs a 'data' section or a class_path + init_args mapping")
        return model_section, cfg, str(data_config)
    data_section = run_config.get("data") if run_config else None
    return model_section, data_section if isinstance(data_section, dict) else None, str(run_config_path)


def _instantiate(section: dict[str, Any], base: type, key: str, where: str) -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, key, fail_untyped=False)
    try:
        cfg = parser.parse_object({key: section})
        return getattr(parser.instantiate(cfg), key)
    except Exception as err:  # jsonargparse raises several types; all mean "bad section"
        raise EvalError(f"{where}: cannot build the {key} ({_one_line(err)[:300]})") from None


def load_ranker(ckpt: Path, model_section: dict[str, Any] | None, where: str) -> Any:
    """The :class:`lightning_modules.Ranker` stored in ``ckpt`` (on the CPU).

    :func:`lightning_modules.load_ranker` first (the model config recorded in the checkpoint
    by ``train.py``); if the checkpoint's hyper-parameters cannot rebuild the model (e.g. a
    checkpoint written before they recorded the backbone), the run config's ``model`` section
    is instantiated and the checkpoint's state dict loaded into it (strictly). The file is read
    once, with ``lightning_modules.load_checkpoint`` (nothing in it can run code); a checkpoint that
    needs code to load, or names classes outside the project's allow-lists, is refused.
    """
    from lightning_modules import Ranker, UnsafeCheckpointError, load_checkpoint, ranker_from_checkpoint

    checkpoint: dict[str, Any] = {}
    try:
        checkpoint = load_checkpoint(ckpt, map_location="cpu")
        model = ranker_from_checkpoint(checkpoint, str(ckpt))
    except (UnsafeCheckpointError, FileNotFoundError) as err:  # refused: no fallback
        raise EvalError(_one_line(err)) from None
    except Exception as first:  # noqa: BLE001 - any other failure falls back to the run config
        if "state_dict" not in checkpoint:
            raise EvalError(f"{ckpt} is not a Lightning checkpoint of a Ranker (no state_dict)") from None
        if model_section is None:
            raise EvalError(f"cannot load a Ranker from {ckpt} ({_one_line(first)[:120]}...) and there is no "
                            "run config.yaml with a 'model' section next to it; "
                            "pass --data-config <run>/config.yaml") from None
        model = _instantiate(model_section, Ranker, "model", where)
        try:
            model.load_state_dict(checkpoint["state_dict"], strict=True)
        except RuntimeError as err:
            raise EvalError(f"{ckpt} does not match the model of {where} ({_one_line(err)[:200]})") from None
    if not isinstance(model, Ranker) or type(model) is Ranker:  # a bare Ranker has no embed()
        raise EvalError(f"{ckpt} does not hold a ranker model (got {type(model).__name__}); "
                        "expected a checkpoint of a lightning_modules.Ranker subclass")
    return model


def prepare(args: argparse.Namespace) -> tuple[Any, list[_Job]]:
    """Validate every argument and load every checkpoint / data module; raise :class:`EvalError`."""
    from evaluation.suite import SuiteError
    from data import RetrievalDataModule

    ckpts = [Path(p) for p in args.ckpt]
    for ckpt in ckpts:
        if not ckpt.is_file():
            raise EvalError(f"checkpoint {ckpt} does not exist")
    if args.devices < 1:
        raise EvalError(f"--devices must be >= 1, got {args.devices}")
    if args.accelerator == "gpu":
        import torch

        available = torch.cuda.device_count()
        if available < args.devices:
            raise EvalError(f"--accelerator gpu --devices {args.devices}: {available} GPU(s) visible")
    data_config = Path(args.data_config) if args.data_config else None
    if data_config is not None and not data_config.is_file():
        raise EvalError(f"--data-config {data_config} does not exist")
    suite = load_suite(args)
    if suite.kind == "universal" and args.devices != 1:
        raise EvalError(f"--devices {args.devices}: universal suites fit one perturbation in a single process; "
                        "use --devices 1")
    jobs: list[_Job] = []
    for ckpt in ckpts:
        model_section, data_section, where = _run_config(ckpt, data_config)
        model = load_ranker(ckpt, model_section, where)
        if data_section is None:
            raise EvalError(f"no data config for {ckpt}: {where} does not exist or has no 'data' section; "
                            "pass --data-config")
        datamodule = _instantiate(data_section, RetrievalDataModule, "data", where)
        try:
            datamodule.setup("test")
        except (FileNotFoundError, ValueError, RuntimeError) as err:
            raise EvalError(f"{where}: cannot load the data ({_one_line(err)[:300]})") from None
        try:
            suite.check_gallery(len(datamodule.eval_set))
        except SuiteError as err:
            raise EvalError(str(err)) from None
        if suite.kind == "ranking":
            check_applicable(ckpt, model, datamodule, suite)
        out_dir = Path(args.output_dir) if args.output_dir else run_dir(ckpt) / "robustness"
        check_writable(out_dir)
        title = f"{run_dir(ckpt).name}/{ckpt.stem}"
        # Reports are named after the checkpoint AND the suite: a second suite never replaces the first.
        stem = f"{ckpt.stem}.{suite.name}"
        json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
        job = _Job(ckpt, model, datamodule, json_path, md_path, title,
                   fingerprint=run_fingerprint(ckpt, suite, data_section))
        if suite.kind == "ranking":
            resume_state(job, overwrite=args.overwrite)
        jobs.append(job)
    stems = [job.json_path for job in jobs]
    if len(set(stems)) != len(stems):
        raise EvalError("two checkpoints would write the same report file; evaluate them separately with "
                        "--output-dir, or rename them")
    return suite, jobs


def check_writable(directory: Path) -> None:
    """Fail now (one line) if reports cannot be written to ``directory``, not after hours of attacks.

    Nothing is left behind: an existing folder gets a temporary file created and removed; a missing
    one is checked through its nearest existing ancestor (it is created only when reports are written).
    """
    import tempfile

    def refuse(reason: str) -> NoReturn:
        raise EvalError(f"cannot write reports to {directory} ({reason}); choose another --output-dir")

    if directory.is_dir():
        try:
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
                pass
        except OSError as err:
            refuse(_one_line(err)[:160])
        return
    ancestor = directory
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        refuse(f"{ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        refuse(f"{ancestor} is not writable")


def check_applicable(ckpt: Path, model: Any, datamodule: Any, suite: Any) -> None:
    """Fail now (one line) if no attack of the suite applies to the model (e.g. PQ-AG on a metric ranker)."""
    from evaluation.engine import RobustnessEvaluator

    split = getattr(datamodule, "protocol", None) == "query_database"
    configs, skipped = RobustnessEvaluator(suite, progress=False).plan(model, query_database=split)
    if not configs:
        reasons = "; ".join(f"{s.attack}: {s.reason}" for s in skipped)
        raise EvalError(f"no attack of suite {suite.name!r} applies to {ckpt} ({type(model).__name__}): {reasons}")


def run_fingerprint(ckpt: Path, suite: Any, data_section: Any) -> dict[str, Any]:
    """What identifies an evaluation: the checkpoint's bytes (sha256), the exact suite, the data config."""
    import hashlib

    digest = hashlib.sha256()
    with ckpt.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"checkpoint_sha256": digest.hexdigest(), "suite": suite.to_dict(), "data": data_section}


def resume_state(job: _Job, overwrite: bool) -> None:
    """Find an earlier run's finished or partial report of this checkpoint and suite.

    Same fingerprint: a finished report is reused (nothing recomputed), a partial one resumed.
    Another fingerprint (the checkpoint or the suite changed): refuse, unless ``--overwrite``.
    """
    import json

    from evaluation.report import Report, config_result_from_row

    if overwrite:
        return
    for path, kind in ((job.json_path, "finished"), (job.partial_path, "partial")):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
            stored = (data.get("meta") or {}).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            data, stored = None, None
        if stored != job.fingerprint:
            raise EvalError(f"{path} is a {kind} report of another run (different checkpoint, suite or data); "
                            "pass --overwrite to replace it, or --output-dir to keep both")
        if kind == "finished":
            job.finished = Report(data)
            return
        try:
            job.completed = [config_result_from_row(row) for row in data.get("results", [])]
        except (KeyError, TypeError, ValueError) as err:
            raise EvalError(f"cannot resume from {path} ({_one_line(err)[:120]}); pass --overwrite") from None
        return


# --------------------------------------------------------------------------- running
def evaluate(job: _Job, args: argparse.Namespace) -> Any:
    """Run the suite on one checkpoint through ``Trainer.test``; write the report (rank 0)."""
    import pytorch_lightning as pl

    from evaluation.report import Report
    from callbacks.robustness_evaluation import RobustnessEvaluation

    partial = job.partial_path
    callback = RobustnessEvaluation(
        suite=args.suite,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        log_images=False,
        progress=not args.no_progress,
        partial_report=str(partial),
        partial_meta={"fingerprint": job.fingerprint, "checkpoint": str(job.ckpt)},
        completed=job.completed or (),
        should_stop=lambda: _STOP_SIGNAL[0] is not None,
    )
    if args.no_sanity:
        callback.evaluator.suite = callback.evaluator.suite.with_overrides(sanity=False)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        num_nodes=1,
        use_distributed_sampler=False,  # the data modules shard themselves
        inference_mode=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.test(job.model, datamodule=job.datamodule, verbose=False)
    if not trainer.is_global_zero:
        return None
    results = callback.last_results
    report = Report.from_results(results, checkpoint=str(job.ckpt), title=job.title,
                                 meta={"accelerator": args.accelerator, "devices": args.devices,
                                       "fingerprint": job.fingerprint,
                                       "resumed_configurations": len(job.completed or [])})
    report.write(job.json_path, job.md_path)  # atomic: a finished report is only ever replaced by one
    partial.unlink(missing_ok=True)
    return report


# --------------------------------------------------------------------------- shared by the universal / transfer modes
def _device(args: argparse.Namespace) -> Any:
    import torch

    return torch.device("cuda" if args.accelerator in ("gpu", "auto") and torch.cuda.is_available() else "cpu")


def gallery_tensors(datamodule: Any, batch_size: int = 1000) -> tuple[Any, Any]:
    """X (``datamodule.eval_set``) as ``(images [N, C, H, W], labels [N])``, in index order."""
    import torch
    from torch.utils.data import DataLoader

    from data.retrieval_batch import collate_retrieval_batch

    loader = DataLoader(datamodule.eval_set, batch_size=batch_size, shuffle=False,
                        collate_fn=collate_retrieval_batch)
    images, labels = [], []
    for batch in loader:
        images.append(batch[0])
        labels.append(batch[1])
    return torch.cat(images), torch.cat(labels)


def _write_outputs(json_path: Path, md_path: Path, data: dict[str, Any], markdown: str) -> dict[str, Any]:
    """Markdown first, JSON last (both atomic), as :meth:`evaluation.report.Report.write` does.

    Returns the data as written (JSON types: tuples become lists), so callers see what the file holds.
    """
    import json

    from evaluation.report import write_atomic

    text = json.dumps(data, indent=2, allow_nan=True) + "\n"
    write_atomic(md_path, markdown)
    write_atomic(json_path, text)
    return json.loads(text)


def _common_meta(suite: Any, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    import datetime

    from evaluation.report import Report

    return {"suite": suite.to_dict(), "suite_file": suite.source, "seed": suite.seed,
            "versions": Report.environment(), "device": str(device),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _check_images(images: Any, where: Any) -> None:
    """Refuse (one line, exit 2) images that are NaN / inf or outside [0, 1] before any attack."""
    import torch

    flat = images.flatten(1)
    bad = torch.nonzero(~(torch.isfinite(flat) & (flat >= 0) & (flat <= 1)).all(dim=1)).reshape(-1).tolist()
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        print(f"{PROG}: error: {where}: {len(bad)} of {len(flat)} images are not valid attack inputs "
              f"(NaN / inf, or outside [0, 1]): indices {shown}", file=sys.stderr)
        raise SystemExit(2)


def _check_embeddings(galleries: dict[str, Any]) -> None:
    """No universal / transfer report from a model whose embedding of X is NaN / inf (exit 3, one line)."""
    import torch

    for name, gallery in galleries.items():
        bad = int((~torch.isfinite(gallery.embeddings.flatten(1))).any(dim=1).sum())
        if bad:
            print(f"{PROG}: error: {name}: {bad} of {len(gallery)} gallery embeddings are NaN / inf; "
                  "no report can be computed from them", file=sys.stderr)
            raise SystemExit(EXIT_INVALID)


def clean_metrics(model: Any, gallery: Any) -> dict[str, float]:
    """Clean Recall@1 / mAP / MAP@R of X against itself (self excluded), as the robustness reports give them."""
    import torch

    from retrieval.metrics import evaluate_retrieval

    with torch.no_grad():
        metrics = evaluate_retrieval(gallery.embeddings, gallery.labels, gallery.embeddings, gallery.labels,
                                     model.distance, exclude_self=True, recall_ks=(1,), nmi=False)
    return {k: float(v) for k, v in metrics.items()}


def _mean(values: Any) -> float:
    return float(values.double().nanmean())


# --------------------------------------------------------------------------- universal suites
class _TaggedWriter:
    """Prefixes every TensorBoard tag with the configuration, so eps / resize variants do not collide."""

    def __init__(self, writer: Any, prefix: str) -> None:
        self.writer, self.prefix = writer, prefix

    def add_scalar(self, tag: str, value: float, global_step: int) -> Any:
        return self.writer.add_scalar(f"{self.prefix}/{tag}", value, global_step)

    def add_image(self, tag: str, img: Any, global_step: int) -> Any:
        return self.writer.add_image(f"{self.prefix}/{tag}", img, global_step)


def _config_label(config: Any) -> str:
    """``I-CA+ eps=0.3 w=1``, ``UAP-IR:list eps=0.03 resize=[0.5, 1.5]``, ``UAP-IR:pair eps=0.1 negative=nearest``.

    Unique per configuration of a suite (it keys the saved perturbations and the TensorBoard tags).
    """
    resize = config.options.get("resize_range")
    label = config.label + ("" if resize is None else f" resize=[{resize[0]:g}, {resize[1]:g}]")
    others = {k: v for k, v in config.options.items() if k not in ("resize_range", "input_size", "eval_scales")}
    return " ".join([label, *(f"{k}={v}" for k, v in others.items())])


def check_universal_model(job: _Job, suite: Any) -> None:
    """Fail early (one line) when a UAP-IR entry resizes queries but the model takes only one input size."""
    import torch

    from evaluation.registry import UNIVERSAL_ATTACKS
    from attacks.uap_retrieval import UAPRetrieval

    dataset = job.datamodule.eval_set
    x = torch.stack([dataset[i][0] for i in range(min(2, len(dataset)))])  # a 2-image probe
    for config in suite.configurations():
        attack = UNIVERSAL_ATTACKS.get(config.attack).build(config.eps, config.size, suite.seed, **config.options)
        if not isinstance(attack, UAPRetrieval):
            continue
        scales = [*attack.eval_scales, *(attack.resize_range or ())]  # type: ignore[attr-defined]
        for scale in scales:
            size = (max(1, round(scale * x.shape[-2])), max(1, round(scale * x.shape[-1])))
            try:
                with torch.no_grad():
                    attack._forward(job.model.eval(), torch.nn.functional.interpolate(x, size=size, mode="bilinear"))
            except RuntimeError as err:
                raise EvalError(
                    f"{job.ckpt}: {_config_label(config)}: the model does not take {size[0]}x{size[1]} inputs "
                    f"({_one_line(err)[:120]}); add input_size: [{x.shape[-2]}, {x.shape[-1]}] to the suite entry "
                    "(queries are then resized to the model's input size) or use a backbone with global pooling"
                ) from None


def evaluate_universal(job: _Job, suite: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Fit every configuration of a universal suite on ``job``'s model; write JSON / Markdown / perturbations."""
    import time

    import torch
    from torch.utils.tensorboard import SummaryWriter

    from evaluation.registry import UNIVERSAL_ATTACKS
    from attacks.gallery import Gallery
    from attacks.transfer import embed_all
    from attacks.uap_retrieval import UAPRetrieval
    from attacks.universal_ranking_attack import fit_unseen_split

    start = time.perf_counter()
    device = _device(args)
    model = job.model.to(device)
    images, labels = gallery_tensors(job.datamodule)
    images, labels = images.to(device), labels.to(device)
    _check_images(images, job.ckpt)
    gallery = Gallery(embed_all(model, images, suite.batch_size), labels)
    _check_embeddings({str(job.ckpt): gallery})
    clean = clean_metrics(model, gallery)
    embed_wall = time.perf_counter() - start
    n = images.shape[0]
    fit, unseen = fit_unseen_split(n, size=suite.fit_size(n), seed=suite.seed)  # disjoint, seeded (Table 6)
    tb_dir = job.json_path.parent / "tensorboard" / job.json_path.stem
    writer = SummaryWriter(str(tb_dir))
    results: list[dict[str, Any]] = []
    perturbations: dict[str, Any] = {}
    total = len(list(suite.configurations()))
    try:
        for config in suite.configurations():
            if _STOP_SIGNAL[0] is not None:  # between configurations: a universal fit is not resumable
                _exit_interrupted(len(results), total, None)
            attack = UNIVERSAL_ATTACKS.get(config.attack).build(config.eps, config.size, suite.seed,
                                                                batch_size=suite.batch_size, **config.options)
            label = _config_label(config)
            logger = _TaggedWriter(writer, label.replace(" ", "_"))
            t0 = time.perf_counter()
            row: dict[str, Any] = {"attack": config.attack, "eps": config.eps, "hparams": attack.hparams,
                                   "options": dict(config.options)}
            if config.size_key:
                row[config.size_key] = config.size
            if isinstance(attack, UAPRetrieval):
                res = attack(model, gallery, images[fit], labels[fit], images[unseen], labels[unseen], fit, unseen,
                             logger=logger, progress=not args.no_progress)
                row["resize_range"] = None if attack.resize_range is None else list(attack.resize_range)
                row["fit"], row["unseen"] = res.fit, res.unseen
                # The frozen r at other input sizes (the slides' "effects of resizing"), unseen queries.
                row["unseen_at_scale"] = {
                    f"{s:g}": attack.evaluate(model, gallery, images[unseen], labels[unseen], res.perturbation,
                                              unseen, scale=s)
                    for s in attack.eval_scales}  # type: ignore[attr-defined]
            else:
                res = attack(model, gallery, images[fit], fit, images[unseen], unseen, logger=logger,
                             progress=not args.no_progress)
                row["fit"] = {k: _mean(v) for k, v in res.fit.items()}
                row["unseen"] = {k: _mean(v) for k, v in (res.unseen or {}).items()}
                row["fit_std"] = {k: float(v.double().std()) for k, v in res.fit.items()}
            row["history"], row["wall_s"] = res.history, time.perf_counter() - t0
            results.append(row)
            perturbations[label] = res.perturbation.detach().cpu()
            if not args.no_progress:
                print(f"{label}: fit {row['fit']} unseen {row['unseen']} ({row['wall_s']:.0f} s)", file=sys.stderr)
    finally:
        writer.close()
    data = {"format": "robust-ranking/universal-report/v1", "checkpoint": str(job.ckpt), "title": job.title,
            **_common_meta(suite, args, device), "clean": clean, "gallery_size": n, "fit_size": int(fit.numel()),
            "fit_indices": fit.tolist(), "unseen_indices": unseen.tolist(), "results": results,
            "embed_wall_s": embed_wall, "wall_s": time.perf_counter() - start, "tensorboard": str(tb_dir)}
    pt_path = job.json_path.with_suffix(".pt")
    pt_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(perturbations, pt_path)
    return _write_outputs(job.json_path, job.md_path, data, universal_markdown(data))


def universal_markdown(data: dict[str, Any]) -> str:
    """Table 6 layout for I-CA / I-QA (rows eps x set, cells clean→adversarial) and a UAP-IR table."""
    lines = [f"# Universal perturbations: {data['title']} ({data['suite']['name']})", "",
             f"fit set: {data['fit_size']} samples of X, unseen set: {data['fit_size']} others "
             f"(|X| = {data['gallery_size']}, seed {data['seed']}); clean R@1 {data['clean']['recall@1']:.4f}, "
             f"mAP {data['clean']['map']:.4f}; wall {data['wall_s']:.0f} s", ""]
    ranking = [r for r in data["results"] if "resize_range" not in r]
    uap = [r for r in data["results"] if "resize_range" in r]
    if ranking:
        def column(r: dict[str, Any]) -> str:  # "I-CA+ w=1", "I-CA+ w=1 shared" (one target set for all)
            shared = " shared" if r["hparams"].get("shared_targets") else ""
            return f"{r['attack']} {'w' if 'w' in r else 'm'}={r.get('w', r.get('m'))}{shared}"

        columns: list[str] = []
        for r in ranking:
            col = column(r)
            if col not in columns:
                columns.append(col)
        lines += ["| ε | set | " + " | ".join(columns) + " |", "| --- | --- |" + " ---: |" * len(columns)]
        for eps in sorted({r["eps"] for r in ranking}):
            for split in ("fit", "unseen"):
                cells = []
                for col in columns:
                    match = [r for r in ranking if r["eps"] == eps and column(r) == col]
                    cells.append(f"{match[0][split]['rank_clean']:.1f}→{match[0][split]['rank']:.1f}"
                                 if match and match[0][split] else "")
                lines.append(f"| {eps:g} | {'seen (fit)' if split == 'fit' else 'unseen'} | " + " | ".join(cells) + " |")
        lines += ["", "Cells: mean normalized rank (%) of the attacked candidates (I-CA) / targets (I-QA), "
                  "clean→with the universal perturbation; \"+\" lowers it, \"-\" raises it.", ""]
    if uap:
        scales = sorted({s for r in uap for s in r["unseen_at_scale"] if s != "1"}, key=float)
        shown = ("resize_range", "input_size", "eval_scales")  # in their own columns / the suite

        def variant(r: dict[str, Any]) -> str:  # the entry's other options, e.g. "negative=nearest"
            return " ".join(f"{k}={v}" for k, v in r.get("options", {}).items() if k not in shown)

        with_options = any(variant(r) for r in uap)
        head = ["attack", *(["options"] if with_options else []), "ε", "resize range", "set", "mAP clean", "mAP",
                "mP@10 clean", "mP@10", "mDR"]
        head += [f"mDR unseen @{s}x" for s in scales]
        left = 5 if with_options else 4
        lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * left + " ---: |" * (len(head) - left)]
        for r in uap:
            resize = "none" if r["resize_range"] is None else f"[{r['resize_range'][0]:g}, {r['resize_range'][1]:g}]"
            for split in ("fit", "unseen"):
                m = r[split]
                cells = [r["attack"], *([variant(r)] if with_options else []), f"{r['eps']:g}", resize, split,
                         *(f"{m[k]:.3f}" for k in ("mAP_clean", "mAP", "mP@10_clean", "mP@10", "mDR"))]
                cells += [f"{r['unseen_at_scale'][s]['mDR']:.3f}" if split == "unseen" and s in r["unseen_at_scale"]
                          else "" for s in scales]
                lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "mAP over the whole ranking of X (self excluded), mP@10, mDR = (mAP_clean - mAP) / mAP_clean.",
                  ""]
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------- transfer
@dataclass
class _TransferPlan:
    suite: Any
    models: dict[str, Any]  # name -> model, every source and target once
    ckpts: dict[str, str]
    sources: list[str]
    targets: list[str]
    datamodule: Any
    json_path: Path
    md_path: Path


def _model_names(paths: list[Path]) -> list[str]:
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


def prepare_transfer(args: argparse.Namespace) -> _TransferPlan:
    """Validate a ``--source`` run and load every model and the shared gallery X; raise :class:`EvalError`."""
    from evaluation.registry import ATTACKS
    from attacks.candidate_attack import CandidateAttack
    from attacks.query_attack import QueryAttack
    from evaluation.suite import SuiteError
    from data import RetrievalDataModule

    paths = list(dict.fromkeys(Path(p) for p in [*args.source, *args.ckpt]))  # each model loaded once
    for ckpt in paths:
        if not ckpt.is_file():
            raise EvalError(f"checkpoint {ckpt} does not exist")
    if args.devices != 1:
        raise EvalError(f"--devices {args.devices}: transfer runs in a single process; use --devices 1")
    if args.accelerator == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise EvalError("--accelerator gpu: no GPU visible")
    suite = load_suite(args)
    if args.gallery_size is not None and args.gallery_size < 2:
        raise EvalError(f"--gallery-size must be >= 2, got {args.gallery_size}")
    if suite.kind != "ranking":
        raise EvalError(f"--source: {args.suite} is a {suite.kind} suite; transfer takes per-sample CA / QA attacks "
                        "(e.g. configs/suites/transfer_eccv2020.yaml)")
    for config in suite.configurations():
        attack = ATTACKS.get(config.attack).build(config.eps, config.size, suite.seed, **config.options)
        if not isinstance(attack, (CandidateAttack, QueryAttack)):
            raise EvalError(f"--source: {config.attack} cannot be transferred (transfer measures the normalized rank "
                            "of CA / QA attacks on the targets); remove it from the suite")
    data_config = Path(args.data_config) if args.data_config else None
    if data_config is not None and not data_config.is_file():
        raise EvalError(f"--data-config {data_config} does not exist")
    names = _model_names(paths)
    models, ckpts, data_sections = {}, {}, {}
    for name, ckpt in zip(names, paths):
        model_section, data_section, where = _run_config(ckpt, data_config)
        models[name], ckpts[name] = load_ranker(ckpt, model_section, where), str(ckpt)
        if data_section is not None:
            data_sections[name] = (data_section, where)
    if not data_sections:
        raise EvalError("no data config: none of the checkpoints has a run config.yaml with a 'data' section; "
                        "pass --data-config")
    # Transfer compares models on ONE gallery X: every run must have been trained / evaluated on the same data.
    classes = {sec.get("class_path") for sec, _ in data_sections.values()}
    if len(classes) > 1:
        raise EvalError(f"the checkpoints use different data modules ({', '.join(sorted(map(str, classes)))}); "
                        "transfer needs one gallery X: pass --data-config")
    section, where = next(iter(data_sections.values()))
    datamodule = _instantiate(section, RetrievalDataModule, "data", where)
    try:
        datamodule.setup("test")
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise EvalError(f"{where}: cannot load the data ({_one_line(err)[:300]})") from None
    n = len(datamodule.eval_set)
    if args.gallery_size is not None and args.gallery_size > n:
        raise EvalError(f"--gallery-size {args.gallery_size} is larger than X ({n} items)")
    try:
        suite.check_gallery(n if args.gallery_size is None else args.gallery_size)
    except SuiteError as err:
        raise EvalError(str(err)) from None
    sources = [names[paths.index(Path(p))] for p in dict.fromkeys(args.source)]
    targets = [names[paths.index(Path(p))] for p in dict.fromkeys(args.ckpt)]
    out_dir = Path(args.output_dir) if args.output_dir else run_dir(Path(args.source[0])) / "robustness"
    stem = f"transfer_{suite.name}"
    return _TransferPlan(suite, models, ckpts, sources, targets, datamodule, out_dir / f"{stem}.json",
                         out_dir / f"{stem}.md")


def evaluate_transfer(plan: _TransferPlan, args: argparse.Namespace) -> dict[str, Any]:
    """Every configuration of the suite: craft on each source, measure on each target (ECCV 2020 Table 5)."""
    import time

    import torch

    from evaluation.registry import ATTACKS
    from attacks.gallery import Gallery
    from attacks.transfer import embed_all, transfer_attack

    start = time.perf_counter()
    suite = plan.suite
    device = _device(args)
    images, labels = gallery_tensors(plan.datamodule)
    subset = None
    if args.gallery_size is not None and args.gallery_size < images.shape[0]:
        # A seeded subset of X (stream seed + 1, independent of the attacked-sample draw) is the gallery
        # of every model: the same protocol at a fraction of the cost of embedding X with each model.
        generator = torch.Generator().manual_seed(suite.seed + 1)
        subset = torch.randperm(images.shape[0], generator=generator)[: args.gallery_size].sort().values
        images, labels = images[subset], labels[subset]
    images, labels = images.to(device), labels.to(device)
    models = {name: model.to(device) for name, model in plan.models.items()}
    # Each model embeds X once; every attack, source and target reuses it.
    _check_images(images, "the gallery")
    galleries = {name: Gallery(embed_all(model, images, suite.batch_size), labels) for name, model in models.items()}
    _check_embeddings({plan.ckpts[name]: gallery for name, gallery in galleries.items()})
    clean = {name: clean_metrics(models[name], gallery) for name, gallery in galleries.items()}
    embed_wall = time.perf_counter() - start
    n = images.shape[0]
    # The engine's choice of attacked samples (RobustnessEvaluator.attacked_indices): same seed, same T.
    indices = torch.randperm(n, generator=torch.Generator().manual_seed(suite.seed))[: suite.num_attacked(n)]
    targets = {name: models[name] for name in plan.targets}
    results = []
    total = len(list(suite.configurations()))
    for config in suite.configurations():
        if _STOP_SIGNAL[0] is not None:  # between configurations (the partial matrices are on disk)
            _exit_interrupted(len(results), total, plan.json_path.with_name(f"{plan.json_path.stem}.partial.json")
                              if results else None)
        attack = ATTACKS.get(config.attack).build(config.eps, config.size, suite.seed, **config.options)
        row: dict[str, Any] = {"attack": config.attack, "eps": config.eps, "hparams": attack.hparams,
                               "matrix": {}, "wall_s": {}}
        if config.size_key:
            row[config.size_key] = config.size
        for src in plan.sources:
            t0 = time.perf_counter()
            res = transfer_attack(models[src], targets, attack, images, labels, indices, suite.batch_size,
                                  source_gallery=galleries[src], target_galleries=galleries,
                                  progress=not args.no_progress)
            row["matrix"][src] = {
                tgt: {"rank_clean": _mean(res.rank_clean[tgt]), "rank": _mean(res.rank[tgt]),
                      "rank_std": float(res.rank[tgt].double().std()) if len(indices) > 1 else 0.0}
                for tgt in plan.targets}
            row["wall_s"][src] = time.perf_counter() - t0
            if not args.no_progress:
                print(f"{config.label} from {src}: "
                      + ", ".join(f"{t} {v['rank_clean']:.1f}->{v['rank']:.1f}" for t, v in row["matrix"][src].items())
                      + f" ({row['wall_s'][src]:.0f} s)", file=sys.stderr)
        results.append(row)
        if len(results) < len(list(suite.configurations())):  # progress: the finished matrices so far
            partial = {"format": "robust-ranking/transfer-report/v1", "partial": True,
                       **_common_meta(suite, args, device), "sources": {s: plan.ckpts[s] for s in plan.sources},
                       "targets": {t: plan.ckpts[t] for t in plan.targets}, "clean": clean, "gallery_size": n,
                       "num_samples": int(indices.numel()), "results": results,
                       "wall_s": time.perf_counter() - start}
            stem = plan.json_path.stem
            _write_outputs(plan.json_path.with_name(f"{stem}.partial.json"),
                           plan.md_path.with_name(f"{stem}.partial.md"), partial, transfer_report_markdown(partial))
    data = {"format": "robust-ranking/transfer-report/v1", **_common_meta(suite, args, device),
            "sources": {s: plan.ckpts[s] for s in plan.sources}, "targets": {t: plan.ckpts[t] for t in plan.targets},
            "clean": clean,
            "gallery_size": n, "gallery_subset": None if subset is None else subset.tolist(),
            "num_samples": int(indices.numel()), "attacked_indices": indices.tolist(),
            "results": results, "embed_wall_s": embed_wall, "wall_s": time.perf_counter() - start}
    written = _write_outputs(plan.json_path, plan.md_path, data, transfer_report_markdown(data))
    plan.json_path.with_name(f"{plan.json_path.stem}.partial.json").unlink(missing_ok=True)
    plan.md_path.with_name(f"{plan.md_path.stem}.partial.md").unlink(missing_ok=True)
    return written


def transfer_report_markdown(data: dict[str, Any]) -> str:
    """One "From \\ To" matrix per configuration (ECCV 2020 Table 5 layout), cells clean→adversarial."""
    from attacks.transfer import transfer_markdown

    lines = [f"# Transfer attacks ({data['suite']['name']})", "",
             "Rows: source model (adversarial examples crafted white-box on it); columns: target model "
             "(the same adversarial images, ranked by the target against its own embedding of X). Cells: mean "
             f"normalized rank (%) clean→adversarial, T = {data['num_samples']} of |X| = {data['gallery_size']}"
             f"{' (a seeded subset of X)' if data.get('gallery_subset') else ''}. "
             "The diagonal is the white-box attack.", ""]
    for row in data["results"]:
        size = next((f" {k}={row[k]}" for k in ("w", "m") if k in row), "")
        matrix = {src: {tgt: (v["rank_clean"], v["rank"]) for tgt, v in cells.items()}
                  for src, cells in row["matrix"].items()}
        wall = sum(row["wall_s"].values())
        lines.append(transfer_markdown(matrix, f"{row['attack']} transfer, ε = {row['eps']:g}{size} ({wall:.0f} s)"))
    lines += ["Models (clean R@1 / mAP on X): " + ", ".join(
        f"{k} = `{v}` ({data['clean'][k]['recall@1']:.4f} / {data['clean'][k]['map']:.4f})"
        for k, v in {**data["sources"], **data["targets"]}.items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Any]:
    """Parse, validate, evaluate every checkpoint; returns the reports (rank 0; empty elsewhere).

    Ranking suites return :class:`evaluation.report.Report` objects; universal suites and ``--source``
    runs return their JSON data (dicts).
    """
    args = build_parser().parse_args(argv)
    _install_signal_handlers()
    # Not news for the user: Lightning's internal deprecation, and the ranker's own NaN-metrics
    # warning (the report says which embeddings are NaN, and eval.py's exit status says it too).
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*codes are NaN / inf: every retrieval metric is NaN")
    try:
        if args.source:
            plan = prepare_transfer(args)
        else:
            suite, jobs = prepare(args)
            if suite.kind == "universal":
                for job in jobs:
                    check_universal_model(job, suite)
    except EvalError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.source:
        data = evaluate_transfer(plan, args)
        print(transfer_report_markdown(data))
        print(f"wrote {plan.json_path} and {plan.md_path}")
        return [data]
    if suite.kind == "universal":
        out = []
        for job in jobs:
            data = evaluate_universal(job, suite, args)
            print(universal_markdown(data))
            print(f"wrote {job.json_path}, {job.md_path} and {job.json_path.with_suffix('.pt')}\n")
            out.append(data)
        return out
    # Lightning's info lines ("GPU available ...") would drown the tables.
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    from evaluation.engine import EvaluationInterrupted, InvalidInputError

    reports, failed = [], []
    for job in jobs:
        if job.finished is not None:
            reports.append(job.finished)
            print(job.finished.to_markdown())
            print(f"{job.json_path} is up to date (same checkpoint, suite and data); --overwrite recomputes it\n")
            continue
        try:
            report = evaluate(job, args)
        except EvaluationInterrupted as err:
            _exit_interrupted(len(err.finished), err.total, job.partial_path)
        except InvalidInputError as err:
            if _is_rank_zero():
                print(f"{PROG}: error: {job.ckpt}: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        if report is None:
            continue
        reports.append(report)
        print(report.to_markdown())
        print(f"wrote {job.json_path} and {job.md_path}\n")
        flagged = report.data.get("warnings") or []
        if flagged and report.data.get("robustness_score") is not None:  # else the error line below says it
            more = f" (+{len(flagged) - 1} more, see the report)" if len(flagged) > 1 else ""
            print(f"{PROG}: warning: {job.ckpt}: {flagged[0]}{more}", file=sys.stderr)
        if report.data.get("robustness_score") is None and report.data.get("score_invalid"):
            failed.append(f"{job.ckpt}: no robustness score: {report.data['score_invalid']} (report: {job.json_path})")
    if len(reports) > 1:
        from evaluation.report import Report, write_atomic

        out_dir = Path(args.output_dir) if args.output_dir else jobs[0].json_path.parent
        text = Report.comparison_markdown(reports, title=f"Robustness comparison ({suite.name})")
        write_atomic(out_dir / "comparison.md", text)
        print(text)
        print(f"wrote {out_dir / 'comparison.md'}")
    if failed:
        for line in failed:
            print(f"{PROG}: error: {line}", file=sys.stderr)
        raise SystemExit(EXIT_INVALID)
    return reports


if __name__ == "__main__":
    main()
