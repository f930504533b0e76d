"""Robustness benchmark of checkpoints: run an attack suite, write JSON + Markdown reports.

::

    python eval.py --ckpt runs/fashion_mnist_ct/version_0/checkpoints/last.ckpt \\
                   --suite configs/suites/eccv2020_28x28.yaml
    python eval.py --ckpt A.ckpt B.ckpt --suite configs/suites/quick.yaml --devices 2 --accelerator cpu
    python eval.py --ckpt A.ckpt --suite configs/suites/universal_eccv2020.yaml     # a 'kind: universal' suite
    python eval.py --source A.ckpt B.ckpt --ckpt A.ckpt B.ckpt C.ckpt --suite configs/suites/transfer_eccv2020.yaml

A thin command line over :func:`evaluation.benchmark` (everything it does is callable from
Python with :class:`evaluation.BenchmarkOptions`); docs/evaluation.md describes the three modes,
the outputs and the resume / signal behaviour (docs/reliability.md).

Exit status: 0 done; 2 bad input (one line ``eval.py: error: ...``, before any attack runs);
3 a report was written but has no valid robustness score (NaN / inf values); 128 + N stopped by
signal N (SIGINT 130, SIGTERM 143) with a partial report that the same command resumes.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from typing import Any, NoReturn

__all__ = ["EXIT_INVALID", "build_parser", "main"]

PROG = "eval.py"
EXIT_INVALID = 3

#: The signal that asked this process to stop (SIGINT / SIGTERM), or None. The engine polls it
#: before every attack batch, so a stop lands within one batch with a valid partial report.
_STOP_SIGNAL: list[int | None] = [None]


def _request_stop(signum: int, _frame: Any) -> None:
    if _STOP_SIGNAL[0] is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop at once
        raise KeyboardInterrupt
    _STOP_SIGNAL[0] = signum


def _is_rank_zero() -> bool:
    """Lightning's DDP launcher re-runs this script with LOCAL_RANK / RANK set for the other ranks."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def _fail(message: str, code: int) -> NoReturn:
    if _is_rank_zero():
        print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Robustness benchmark of ranker checkpoints (attack suites).")
    parser.add_argument("--ckpt", nargs="+", required=True, metavar="CKPT",
                        help="checkpoint file(s); with --source: the target models")
    parser.add_argument("--suite", required=True,
                        help="suite YAML or a shipped suite's name, e.g. quick or configs/suites/eccv2020_28x28.yaml "
                             "(a 'kind: universal' suite fits universal perturbations)")
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


def main(argv: list[str] | None = None) -> list[Any]:
    """Parse, validate, evaluate every checkpoint; returns the reports (rank 0; empty elsewhere).

    Ranking suites return :class:`evaluation.report.Report` objects; universal suites and ``--source``
    runs return their JSON data (dicts).
    """
    args = build_parser().parse_args(argv)
    _STOP_SIGNAL[0] = None
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _request_stop)
    # Not news for the user: Lightning's internal deprecation, and the ranker's own NaN-metrics
    # warning (the report says which embeddings are NaN, and the exit status says it too).
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*codes are NaN / inf: every retrieval metric is NaN")
    from evaluation import BenchmarkOptions, EvaluationError, EvaluationInterrupted, InvalidInputError, benchmark
    from evaluation.data import NonFiniteEmbeddingsError

    # Lightning's info lines ("GPU available ...") would drown the tables (set after Lightning's import,
    # which sets its own level).
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    options = BenchmarkOptions(
        suite=args.suite, num_samples=args.num_samples, batch_size=args.batch_size, devices=args.devices,
        accelerator=args.accelerator, data_config=args.data_config, output_dir=args.output_dir,
        progress=not args.no_progress, overwrite=args.overwrite, sanity=not args.no_sanity,
        gallery_size=args.gallery_size, should_stop=lambda: _STOP_SIGNAL[0] is not None)
    try:
        run = benchmark(args.ckpt, options, source=args.source)
    except (EvaluationError, InvalidInputError) as err:
        _fail(str(err), 2)
    except NonFiniteEmbeddingsError as err:
        _fail(str(err), EXIT_INVALID)
    except EvaluationInterrupted as err:
        if _is_rank_zero():
            where = f" (partial report: {err.partial})" if err.partial is not None else ""
            print(f"{PROG}: interrupted after {len(err.finished)} of {err.total} configurations; "
                  f"run the same command to resume{where}", file=sys.stderr)
        raise SystemExit(128 + int(_STOP_SIGNAL[0] or signal.SIGINT)) from None
    return _print_run(run)


def _print_run(run: Any) -> list[Any]:
    """Print every table and where it was written; warnings and invalid scores on stderr."""
    from evaluation.transfer import transfer_report_markdown
    from evaluation.universal import universal_markdown

    failed = []
    for result in run.results:
        data = result.data
        if run.kind == "ranking":
            print(result.report.to_markdown())
        else:
            print((transfer_report_markdown if run.kind == "transfer" else universal_markdown)(data))
        extra = f" and {result.json_path.with_suffix('.pt')}" if run.kind == "universal" else ""
        print(f"{result.json_path} is up to date (same checkpoint, suite and data); --overwrite recomputes it\n"
              if result.reused else f"wrote {result.json_path}, {result.md_path}{extra}\n")
        if run.kind != "ranking":
            continue
        flagged = data.get("warnings") or []
        if flagged and data.get("robustness_score") is not None:  # else the error line below says it
            more = f" (+{len(flagged) - 1} more, see the report)" if len(flagged) > 1 else ""
            print(f"{PROG}: warning: {result.checkpoint}: {flagged[0]}{more}", file=sys.stderr)
        if data.get("robustness_score") is None and data.get("score_invalid"):
            failed.append(f"{result.checkpoint}: no robustness score: {data['score_invalid']} "
                          f"(report: {result.json_path})")
    if run.comparison is not None:
        print(run.comparison)
        print(f"wrote {run.comparison_path}")
    for line in failed:
        print(f"{PROG}: error: {line}", file=sys.stderr)
    if failed:
        raise SystemExit(EXIT_INVALID)
    return [result.report for result in run.results]


if __name__ == "__main__":
    main()
