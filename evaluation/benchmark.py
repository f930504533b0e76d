"""The per-sample benchmark runner behind ``eval.py``: checkpoints x a suite -> reports.

Each checkpoint is loaded safely (:mod:`evaluation.checkpoints`), its data module built from the
run's ``config.yaml`` or an explicit data config, and a ranking suite runs through a Lightning
``Trainer.test`` with the :class:`callbacks.RobustnessEvaluation` callback (the one engine), so
``devices > 1`` uses DDP exactly as during training and the numbers do not depend on it. Universal
suites and transfer runs go to :mod:`evaluation.universal` / :mod:`evaluation.transfer`.

Python::

    from evaluation import BenchmarkOptions, benchmark

    run = benchmark(["runs/ct/version_0/checkpoints/last.ckpt"], BenchmarkOptions(suite="configs/suites/quick.yaml"))
    run.results[0].report.data["robustness_score"]

Reports: ``<run>/robustness/<ckpt-stem>.<suite-name>.json`` / ``.md`` (or in ``output_dir``), written
atomically at the end; ``<stem>.partial.json`` holds the finished configurations meanwhile and is
resumed by the same run (see docs/reliability.md). Several checkpoints: also ``comparison.md``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytorch_lightning as pl
import torch

from data import RetrievalDataModule
from evaluation.checkpoints import instantiate, load_ranker, run_config, run_dir, run_fingerprint
from evaluation.engine import EvaluationInterrupted, RobustnessEvaluator
from evaluation.errors import EvaluationError, one_line
from evaluation.options import BenchmarkOptions, load_suite, resolve_suite
from evaluation.report import Report, config_result_from_row, write_atomic
from evaluation.suite import SuiteError
from evaluation.transfer import evaluate_transfer, prepare_transfer
from evaluation.universal import check_universal_model, evaluate_universal

__all__ = ["BenchmarkResult", "BenchmarkRun", "Job", "benchmark", "evaluate", "prepare"]


@dataclass
class Job:
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


@dataclass
class BenchmarkResult:
    """One finished report: a :class:`evaluation.report.Report` (ranking suites) or the JSON data
    (universal, transfer), where it was written, and whether an up-to-date report was reused."""

    checkpoint: str
    report: Any
    json_path: Path
    md_path: Path
    reused: bool = False

    @property
    def data(self) -> dict[str, Any]:
        return self.report.data if isinstance(self.report, Report) else self.report


@dataclass
class BenchmarkRun:
    """What :func:`benchmark` produced (on rank 0; empty on the other ranks of a DDP run)."""

    kind: str
    results: list[BenchmarkResult] = field(default_factory=list)
    comparison_path: Path | None = None
    comparison: str | None = None


def benchmark(checkpoints: Sequence[str | Path], options: BenchmarkOptions,
              source: Sequence[str | Path] | None = None) -> BenchmarkRun:
    """Run ``options.suite`` on every checkpoint and write the reports (the whole of ``eval.py``).

    With ``source``: the transfer protocol (attacks crafted on each source, measured on each of
    ``checkpoints``). Every bad input raises :class:`EvaluationError` before any work.

    Raises:
        EvaluationError: bad input (one line).
        evaluation.InvalidInputError: an image of X is NaN / inf or outside [0, 1].
        evaluation.data.NonFiniteEmbeddingsError: universal / transfer: a model embeds X with NaN / inf.
        EvaluationInterrupted: ``options.should_stop`` asked to stop (``err.partial``: the partial report).
    """
    if source:
        plan = prepare_transfer(source, checkpoints, options)
        data = evaluate_transfer(plan, options)
        return BenchmarkRun("transfer", [BenchmarkResult(", ".join(map(str, source)), data, plan.json_path,
                                                         plan.md_path)])
    suite, jobs = prepare(checkpoints, options)
    run = BenchmarkRun(suite.kind)
    for job in jobs:
        if job.finished is not None:
            run.results.append(BenchmarkResult(str(job.ckpt), job.finished, job.json_path, job.md_path, reused=True))
        elif suite.kind == "universal":
            data = evaluate_universal(job.model, job.datamodule, suite, job.json_path, job.md_path,
                                      checkpoint=str(job.ckpt), title=job.title, device=options.device,
                                      progress=options.progress, should_stop=options.should_stop)
            run.results.append(BenchmarkResult(str(job.ckpt), data, job.json_path, job.md_path))
        else:
            report = evaluate(job, options)
            if report is not None:  # None on the other DDP ranks
                run.results.append(BenchmarkResult(str(job.ckpt), report, job.json_path, job.md_path))
    reports = [r.report for r in run.results if isinstance(r.report, Report)]
    if len(reports) > 1:
        out_dir = Path(options.output_dir) if options.output_dir else jobs[0].json_path.parent
        run.comparison = Report.comparison_markdown(reports, title=f"Robustness comparison ({suite.name})")
        run.comparison_path = write_atomic(out_dir / "comparison.md", run.comparison)
    return run


def prepare(checkpoints: Sequence[str | Path], options: BenchmarkOptions) -> tuple[Any, list[Job]]:
    """Validate every option and load every checkpoint / data module; raise :class:`EvaluationError`.

    Nothing is attacked and nothing is written here: every bad input is found before any work.
    """
    ckpts = [Path(p) for p in checkpoints]
    for ckpt in ckpts:
        if not ckpt.is_file():
            raise EvaluationError(f"checkpoint {ckpt} does not exist")
    if options.devices < 1:
        raise EvaluationError(f"--devices must be >= 1, got {options.devices}")
    if options.accelerator == "gpu":
        available = torch.cuda.device_count()
        if available < options.devices:
            raise EvaluationError(f"--accelerator gpu --devices {options.devices}: {available} GPU(s) visible")
    data_config = Path(options.data_config) if options.data_config else None
    if data_config is not None and not data_config.is_file():
        raise EvaluationError(f"--data-config {data_config} does not exist")
    suite = load_suite(options)
    if suite.kind == "universal" and options.devices != 1:
        raise EvaluationError(f"--devices {options.devices}: universal suites fit one perturbation in a single process; "
                        "use --devices 1")
    jobs: list[Job] = []
    for ckpt in ckpts:
        model_section, data_section, where = run_config(ckpt, data_config)
        model = load_ranker(ckpt, model_section, where)
        if data_section is None:
            raise EvaluationError(f"no data config for {ckpt}: {where} does not exist or has no 'data' section; "
                            "pass --data-config")
        datamodule = instantiate(data_section, RetrievalDataModule, "data", where)
        try:
            datamodule.setup("test")
        except (FileNotFoundError, ValueError, RuntimeError) as err:
            raise EvaluationError(f"{where}: cannot load the data ({one_line(err)[:300]})") from None
        try:
            suite.check_gallery(len(datamodule.eval_set))
        except SuiteError as err:
            raise EvaluationError(str(err)) from None
        if suite.kind == "ranking":
            check_applicable(ckpt, model, datamodule, suite)
        out_dir = Path(options.output_dir) if options.output_dir else run_dir(ckpt) / "robustness"
        check_writable(out_dir)
        title = f"{run_dir(ckpt).name}/{ckpt.stem}"
        # Reports are named after the checkpoint AND the suite: a second suite never replaces the first.
        stem = f"{ckpt.stem}.{suite.name}"
        json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
        job = Job(ckpt, model, datamodule, json_path, md_path, title,
                   fingerprint=run_fingerprint(ckpt, suite, data_section))
        if suite.kind == "ranking":
            resume_state(job, overwrite=options.overwrite)
        else:
            check_universal_model(model, datamodule.eval_set, suite, ckpt)
        jobs.append(job)
    stems = [job.json_path for job in jobs]
    if len(set(stems)) != len(stems):
        raise EvaluationError("two checkpoints would write the same report file; evaluate them separately with "
                        "--output-dir, or rename them")
    return suite, jobs


def check_writable(directory: Path) -> None:
    """Fail now (one line) if reports cannot be written to ``directory``, not after hours of attacks.

    Nothing is left behind: an existing folder gets a temporary file created and removed; a missing
    one is checked through its nearest existing ancestor (it is created only when reports are written).
    """
    def refuse(reason: str) -> NoReturn:
        raise EvaluationError(f"cannot write reports to {directory} ({reason}); choose another --output-dir")

    if directory.is_dir():
        try:
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
                pass
        except OSError as err:
            refuse(one_line(err)[:160])
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
    split = getattr(datamodule, "protocol", None) == "query_database"
    configs, skipped = RobustnessEvaluator(suite, progress=False).plan(model, query_database=split)
    if not configs:
        reasons = "; ".join(f"{s.attack}: {s.reason}" for s in skipped)
        raise EvaluationError(f"no attack of suite {suite.name!r} applies to {ckpt} ({type(model).__name__}): {reasons}")


def resume_state(job: Job, overwrite: bool) -> None:
    """Find an earlier run's finished or partial report of this checkpoint and suite.

    Same fingerprint: a finished report is reused (nothing recomputed), a partial one resumed.
    Another fingerprint (the checkpoint or the suite changed): refuse, unless ``--overwrite``.
    """
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
            raise EvaluationError(f"{path} is a {kind} report of another run (different checkpoint, suite or data); "
                            "pass --overwrite to replace it, or --output-dir to keep both")
        if kind == "finished":
            job.finished = Report(data)
            return
        try:
            job.completed = [config_result_from_row(row) for row in data.get("results", [])]
        except (KeyError, TypeError, ValueError) as err:
            raise EvaluationError(f"cannot resume from {path} ({one_line(err)[:120]}); pass --overwrite") from None
        return


def evaluate(job: Job, options: BenchmarkOptions) -> Any:
    """Run the suite on one checkpoint through ``Trainer.test``; write the report (rank 0)."""
    # Imported here: the callback is the engine's Lightning front end and imports evaluation itself.
    from callbacks.robustness_evaluation import RobustnessEvaluation

    partial = job.partial_path
    callback = RobustnessEvaluation(
        suite=str(resolve_suite(options.suite)),
        num_samples=options.num_samples,
        batch_size=options.batch_size,
        log_images=False,
        progress=options.progress,
        partial_report=str(partial),
        partial_meta={"fingerprint": job.fingerprint, "checkpoint": str(job.ckpt)},
        completed=job.completed or (),
        should_stop=options.should_stop,
        clean_metrics=True,  # the one clean-metric function of every report family
    )
    if not options.sanity:
        callback.evaluator.suite = callback.evaluator.suite.with_overrides(sanity=False)
    trainer = pl.Trainer(
        accelerator=options.accelerator,
        devices=options.devices,
        strategy="ddp" if options.devices > 1 else "auto",
        num_nodes=1,
        use_distributed_sampler=False,  # the data modules shard themselves
        inference_mode=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    try:
        trainer.test(job.model, datamodule=job.datamodule, verbose=False)
    except EvaluationInterrupted as err:
        err.partial = partial
        raise
    if not trainer.is_global_zero:
        return None
    results = callback.last_results
    report = Report.from_results(results, checkpoint=str(job.ckpt), title=job.title,
                                 meta={"accelerator": options.accelerator, "devices": options.devices,
                                       "fingerprint": job.fingerprint,
                                       "resumed_configurations": len(job.completed or [])})
    report.write(job.json_path, job.md_path)  # atomic: a finished report is only ever replaced by one
    partial.unlink(missing_ok=True)
    return report
