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

Every argument error (a missing checkpoint, a file that is not a Ranker checkpoint, an unknown
attack or a typo in the suite, an epsilon out of range, a w / m larger than the gallery, a bad
data config) is one line, ``eval.py: error: ...``, exit code 2, before any attack runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

__all__ = ["main"]

PROG = "eval.py"


class EvalError(Exception):
    """Bad input, reported as one line before any work starts."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Robustness benchmark of ranker checkpoints (attack suites).")
    parser.add_argument("--ckpt", nargs="+", required=True, metavar="CKPT", help="checkpoint file(s)")
    parser.add_argument("--suite", required=True, help="suite YAML, e.g. configs/suites/eccv2020_28x28.yaml")
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
    return parser


@dataclass
class _Job:
    """One checkpoint, ready to evaluate."""

    ckpt: Path
    model: Any
    datamodule: Any
    json_path: Path
    md_path: Path
    title: str


# --------------------------------------------------------------------------- preparation
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
    is instantiated and the checkpoint's state dict loaded into it (strictly).
    """
    import torch

    from lightning_modules import Ranker
    from lightning_modules import load_ranker as load_recorded_ranker

    try:
        model = load_recorded_ranker(str(ckpt), map_location="cpu")
    except Exception as first:  # noqa: BLE001 - any failure falls back to the run config
        try:
            checkpoint = torch.load(str(ckpt), map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001
            raise EvalError(f"{ckpt} is not a checkpoint ({_one_line(err)[:200]})") from None
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
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
    from attacks.suite import Suite, SuiteError
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
    try:
        suite = Suite.from_yaml(args.suite)
        suite = suite.with_overrides(num_samples=args.num_samples, batch_size=args.batch_size)
    except SuiteError as err:
        raise EvalError(str(err)) from None
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
        out_dir = Path(args.output_dir) if args.output_dir else run_dir(ckpt) / "robustness"
        title = f"{run_dir(ckpt).name}/{ckpt.stem}"
        json_path, md_path = out_dir / f"{ckpt.stem}.json", out_dir / f"{ckpt.stem}.md"
        jobs.append(_Job(ckpt, model, datamodule, json_path, md_path, title))
    stems = [job.json_path for job in jobs]
    if len(set(stems)) != len(stems):
        raise EvalError("two checkpoints would write the same report file; evaluate them separately with "
                        "--output-dir, or rename them")
    return suite, jobs


# --------------------------------------------------------------------------- running
def evaluate(job: _Job, args: argparse.Namespace) -> Any:
    """Run the suite on one checkpoint through ``Trainer.test``; write the report (rank 0)."""
    import pytorch_lightning as pl

    from attacks.report import Report
    from callbacks.robustness_evaluation import RobustnessEvaluation

    partial = job.json_path.with_name(f"{job.ckpt.stem}.partial.json")
    callback = RobustnessEvaluation(
        suite=args.suite,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        log_images=False,
        progress=not args.no_progress,
        partial_report=str(partial),
    )
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
                                 meta={"accelerator": args.accelerator, "devices": args.devices})
    report.write(job.json_path, job.md_path)  # atomic: a finished report is only ever replaced by one
    partial.unlink(missing_ok=True)
    return report


def main(argv: list[str] | None = None) -> list[Any]:
    """Parse, validate, evaluate every checkpoint; returns the reports (rank 0; empty elsewhere)."""
    args = build_parser().parse_args(argv)
    try:
        suite, jobs = prepare(args)
    except EvalError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    # Lightning's info lines ("GPU available ...") would drown the tables.
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    reports = []
    for job in jobs:
        report = evaluate(job, args)
        if report is None:
            continue
        reports.append(report)
        print(report.to_markdown())
        print(f"wrote {job.json_path} and {job.md_path}\n")
    if len(reports) > 1:
        from attacks.report import Report, write_atomic

        out = Path(args.output_dir) if args.output_dir else jobs[0].json_path.parent
        text = Report.comparison_markdown(reports, title=f"Robustness comparison ({suite.name})")
        write_atomic(out / "comparison.md", text)
        print(text)
        print(f"wrote {out / 'comparison.md'}")
    return reports


if __name__ == "__main__":
    main()
