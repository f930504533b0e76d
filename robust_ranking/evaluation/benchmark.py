"""The per-sample benchmark runner behind ``eval.py``: checkpoints x a suite -> reports.

Each checkpoint is loaded safely (:mod:`evaluation.checkpoints`), its data module built from the
run's ``config.yaml`` or an explicit data config, and a ranking suite runs through a Lightning
``Trainer.test`` with the :class:`callbacks.RobustnessEvaluation` callback (the one engine), so
``devices > 1`` uses DDP exactly as during training and the numbers do not depend on it. Universal
suites and transfer runs go to :mod:`evaluation.universal` / :mod:`evaluation.transfer`, also inside a
``Trainer.test`` (:func:`evaluation.launch.run_distributed`), so they take ``devices > 1`` the same way.

Python::

    from robust_ranking.evaluation import BenchmarkOptions, benchmark

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

from robust_ranking.data import RetrievalDataModule
from robust_ranking.evaluation.checkpoints import instantiate, load_ranker, run_config, run_dir, run_fingerprint
from robust_ranking.evaluation.engine import EvaluationInterrupted, RobustnessEvaluator
from robust_ranking.evaluation.errors import EvaluationError, one_line
from robust_ranking.evaluation.launch import run_distributed
from robust_ranking.evaluation.options import BenchmarkOptions, load_suite, resolve_suite
from robust_ranking.evaluation.report import Report, config_result_from_row, write_atomic
from robust_ranking.evaluation.suite import SuiteError
from robust_ranking.evaluation.transfer import evaluate_transfer, prepare_transfer
from robust_ranking.evaluation.universal import check_universal_model, evaluate_universal

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
        check_trainer_options(options)
        check_single_precision(options, "transfer runs")
        plan = prepare_transfer(source, checkpoints, options)
        # Through Trainer.test like the per-sample runner: --devices N is Lightning's DDP, attack batches split.
        data = run_distributed(lambda dist, device: evaluate_transfer(plan, options, collectives=dist, device=device),
                               **launch_kwargs(options))
        if data is None:  # the other DDP ranks
            return BenchmarkRun("transfer")
        return BenchmarkRun("transfer", [BenchmarkResult(", ".join(map(str, source)), data, plan.json_path,
                                                         plan.md_path)])
    suite, jobs = prepare(checkpoints, options)
    run = BenchmarkRun(suite.kind)
    for job in jobs:
        if job.finished is not None:
            run.results.append(BenchmarkResult(str(job.ckpt), job.finished, job.json_path, job.md_path, reused=True))
        elif suite.kind == "universal":
            data = run_distributed(
                lambda dist, device, job=job: evaluate_universal(
                    job.model, job.datamodule, suite, job.json_path, job.md_path, checkpoint=str(job.ckpt),
                    title=job.title, device=device, progress=options.progress, should_stop=options.should_stop,
                    collectives=dist),
                **launch_kwargs(options))
            if data is not None:  # None on the other DDP ranks
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
    check_trainer_options(options)
    data_config = Path(options.data_config) if options.data_config else None
    if data_config is not None and not data_config.is_file():
        raise EvaluationError(f"--data_config {data_config} does not exist")
    suite = load_suite(options)
    if suite.kind == "universal":
        check_single_precision(options, "universal suites")
    jobs: list[Job] = []
    names = report_names(ckpts, options.output_dir)
    for ckpt in ckpts:
        model_section, data_section, where = run_config(ckpt, data_config)
        model = load_ranker(ckpt, model_section, where)
        if data_section is None:
            raise EvaluationError(f"no data config for {ckpt}: {where} does not exist or has no 'data' section; "
                            "pass --data_config")
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
        name = names[ckpt]
        title = f"{run_dir(ckpt).name}/{ckpt.stem}" if name == ckpt.stem else name.replace(".", "/")
        # Reports are named after the checkpoint AND the suite: a second suite never replaces the first.
        stem = f"{name}.{suite.name}"
        json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
        fingerprint = run_fingerprint(ckpt, suite, data_section)
        if precision_of(options) != "32-true":  # other numbers: never resumed into a 32-bit report
            fingerprint = {**fingerprint, "precision": precision_of(options)}
        job = Job(ckpt, model, datamodule, json_path, md_path, title, fingerprint=fingerprint)
        if suite.kind == "ranking":
            resume_state(job, overwrite=options.overwrite)
        else:
            check_universal_model(model, datamodule.eval_set, suite, ckpt)
        jobs.append(job)
    stems = [job.json_path for job in jobs]
    if len(set(stems)) != len(stems):
        raise EvaluationError("two checkpoints would write the same report file (the same checkpoint twice, or "
                              "runs with the same experiment and version names); evaluate them separately with "
                              "--output_dir, or rename them")
    return suite, jobs


#: ``--precision`` values: Lightning's names and their short aliases. The attacks run under the
#: precision's autocast; ``*-true`` half / double precisions would convert the model but not the images.
PRECISIONS = {"32-true": "32-true", "32": "32-true", "16-mixed": "16-mixed", "16": "16-mixed",
              "bf16-mixed": "bf16-mixed", "bf16": "bf16-mixed"}
ACCELERATORS = ("cpu", "gpu", "cuda", "auto")


def precision_of(options: BenchmarkOptions) -> str:
    """Lightning's name of ``options.precision`` (``16`` -> ``16-mixed``), or the value itself."""
    return PRECISIONS.get(str(options.precision), str(options.precision))


def trainer_kwargs(options: BenchmarkOptions) -> dict[str, Any]:
    """The Lightning ``Trainer`` settings of the per-sample runner (``eval.py``'s Trainer flags)."""
    strategy = options.strategy
    if strategy == "auto" and options.devices * options.num_nodes > 1:
        strategy = "ddp"  # one process per device, started by Lightning (or by torchrun / SLURM)
    return {"accelerator": options.accelerator, "devices": options.devices, "num_nodes": options.num_nodes,
            "strategy": strategy, "precision": precision_of(options)}


def check_trainer_options(options: BenchmarkOptions) -> None:
    """Fail now (one line) on trainer options that Lightning would refuse after the checkpoints load."""
    for name in ("devices", "num_nodes"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EvaluationError(f"--{name} must be an integer >= 1, got {value!r}")
    if options.accelerator not in ACCELERATORS:
        raise EvaluationError(f"--accelerator {options.accelerator!r}: choose one of {', '.join(ACCELERATORS)}")
    if str(options.precision) not in PRECISIONS:
        raise EvaluationError(f"--precision {options.precision!r}: choose one of {', '.join(PRECISIONS)} (the "
                              "attacks take float32 images, so only 32-bit and mixed precisions apply)")
    if "spawn" in options.strategy or "notebook" in options.strategy or "fork" in options.strategy:
        raise EvaluationError(f"--strategy {options.strategy}: the reports are written by the launching process; "
                              "use ddp (Lightning starts one process per device, or torchrun / SLURM does)")
    if precision_of(options) == "16-mixed" and options.device.type == "cpu":
        raise EvaluationError(f"--precision {options.precision}: float16 autocast needs a GPU; use bf16-mixed on a CPU")
    if options.accelerator in ("gpu", "cuda"):
        available = torch.cuda.device_count()
        if available < options.devices:
            raise EvaluationError(f"--accelerator {options.accelerator} --devices {options.devices}: "
                                  f"{available} GPU(s) visible")
    try:  # Lightning's own checks (unknown strategy, devices unlike what torchrun / SLURM started); launches nothing
        pl.Trainer(**trainer_kwargs(options), logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False)
    except (ValueError, TypeError, RuntimeError) as err:  # MisconfigurationException is a ValueError
        raise EvaluationError(f"--accelerator / --strategy / --precision: {one_line(err)[:300]}") from None


def launch_kwargs(options: BenchmarkOptions) -> dict[str, Any]:
    """The Trainer settings of the universal / transfer runners: :func:`trainer_kwargs` in 32-bit."""
    return {k: v for k, v in trainer_kwargs(options).items() if k != "precision"}


def check_single_precision(options: BenchmarkOptions, what: str) -> None:
    """Universal suites and transfer runs attack in float32 (the mixed precisions apply to the per-sample runner)."""
    if precision_of(options) != "32-true":
        raise EvaluationError(f"--precision {options.precision}: {what} attack in 32-bit precision; use --precision 32")


def report_names(ckpts: Sequence[Path], output_dir: str | Path | None) -> dict[Path, str]:
    """Each checkpoint's report name: its file stem (``last``), or, where checkpoints of several runs
    share a stem and an output folder (``--output_dir``), ``<experiment>.<version>.<stem>`` from the
    LightningCLI layout ``runs/<experiment>/<version>/checkpoints/<stem>.ckpt``
    (``fashion_mnist_ct.version_0.last``), so that one command benchmarks the ``last.ckpt`` of
    several runs side by side."""
    def folder(ckpt: Path) -> Path:
        return Path(output_dir) if output_dir else run_dir(ckpt) / "robustness"

    names: dict[Path, str] = {}
    for ckpt in ckpts:
        clash = [c for c in ckpts if c.stem == ckpt.stem and folder(c) == folder(ckpt) and c.resolve() != ckpt.resolve()]
        run = run_dir(ckpt)
        names[ckpt] = f"{run.parent.name}.{run.name}.{ckpt.stem}" if clash else ckpt.stem
    return names


def check_writable(directory: Path) -> None:
    """Fail now (one line) if reports cannot be written to ``directory``, not after hours of attacks.

    Nothing is left behind: an existing folder gets a temporary file created and removed; a missing
    one is checked through its nearest existing ancestor (it is created only when reports are written).
    """
    def refuse(reason: str) -> NoReturn:
        raise EvaluationError(f"cannot write reports to {directory} ({reason}); choose another --output_dir")

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
                            "pass --overwrite to replace it, or --output_dir to keep both")
        if kind == "finished":
            job.finished = Report(data)
            return
        try:
            job.completed = [config_result_from_row(row) for row in data.get("results", [])]
        except (KeyError, TypeError, ValueError) as err:
            raise EvaluationError(f"cannot resume from {path} ({one_line(err)[:120]}); pass --overwrite") from None
        return


def tensorboard_logger(job: Job) -> Any:
    """The TensorBoard logger of one checkpoint's evaluation: ``<report dir>/tensorboard/<ckpt-stem>.<suite>/``
    (a sub-run per checkpoint under one logdir, named like the report). Event files of an earlier
    evaluation of the same name are removed first (by the launching process only), so a re-run
    replaces them instead of showing twice."""
    from pytorch_lightning.loggers import TensorBoardLogger

    log_dir = job.json_path.parent / "tensorboard" / job.json_path.stem
    if "LOCAL_RANK" not in os.environ and log_dir.is_dir():  # not in a DDP worker started by Lightning
        for old in log_dir.glob("events.out.tfevents.*"):
            old.unlink(missing_ok=True)
    return TensorBoardLogger(str(log_dir.parent), name=log_dir.name, version="", default_hp_metric=False)


def evaluate(job: Job, options: BenchmarkOptions) -> Any:
    """Run the suite on one checkpoint through ``Trainer.test``; write the report (rank 0)."""
    # Imported here: the callback is the engine's Lightning front end and imports evaluation itself.
    from robust_ranking.callbacks.robustness_evaluation import RobustnessEvaluation

    partial = job.partial_path
    callback = RobustnessEvaluation(
        suite=str(resolve_suite(options.suite)),
        num_samples=options.num_samples,
        batch_size=options.batch_size,
        log_images=True,
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
        **trainer_kwargs(options),
        use_distributed_sampler=False,  # the data modules shard themselves
        inference_mode=True,
        logger=tensorboard_logger(job),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    if precision_of(options) != "32-true":
        _autocast_model(job.model, trainer)
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
                                       "num_nodes": options.num_nodes, "precision": precision_of(options),
                                       "fingerprint": job.fingerprint,
                                       "resumed_configurations": len(job.completed or [])})
    report.write(job.json_path, job.md_path)  # atomic: a finished report is only ever replaced by one
    partial.unlink(missing_ok=True)
    return report


def _autocast_model(model: Any, trainer: pl.Trainer) -> None:
    """Run ``model``'s forwards (embed / encode / forward) under the trainer's precision (autocast for
    the mixed precisions), returning float32: Lightning applies it to ``test_step`` only, and the attacks,
    retrieval and metrics run in the robustness callback on the model's outputs."""
    context = trainer.strategy.precision_plugin.forward_context
    for name in ("embed", "encode", "forward"):
        method = getattr(model, name, None)
        if method is None:
            continue

        def wrapped(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
            with context():
                out = _method(*args, **kwargs)
            return out.float() if torch.is_tensor(out) and out.dtype in (torch.float16, torch.bfloat16) else out

        setattr(model, name, wrapped)
