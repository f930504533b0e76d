"""Robustness benchmark of checkpoints: run an attack suite, write JSON + Markdown reports.

::

    python eval.py --ckpt runs/fashion_mnist_ct/version_0/checkpoints/last.ckpt --suite eccv2020_28x28
    python eval.py --ckpt A.ckpt B.ckpt --suite quick --devices 2 --accelerator cpu
    python eval.py --config my_eval.yaml --num_samples 100     # any option from a YAML, flags override it
    python eval.py --config my_eval.yaml --print_config        # the resolved options, as a YAML
    python eval.py --ckpt A.ckpt --suite universal_eccv2020    # a 'kind: universal' suite
    python eval.py --source A.ckpt B.ckpt --ckpt A.ckpt B.ckpt C.ckpt --suite transfer_eccv2020

A thin jsonargparse command line (like ``train.py``'s LightningCLI) over :func:`evaluation.benchmark`:
one option per field of :class:`evaluation.BenchmarkOptions`, plus ``--ckpt`` / ``--source``, so
everything is callable from Python with plain arguments. The options before the jsonargparse switch
(``--data-config``, ``--num-samples``, ``--no-progress``, bare ``--overwrite`` ...) still work: dashes
are read as underscores, ``--no-X`` is ``--X false`` and a bare boolean flag is ``true``.
docs/evaluation.md describes the three modes, multi-node runs, the outputs and the resume / signal
behaviour (docs/reliability.md).

Exit status: 0 done; 2 bad input (one line ``eval.py: error: ...``, before any attack runs);
3 a report was written but has no valid robustness score (NaN / inf values); 128 + N stopped by
signal N (SIGINT 130, SIGTERM 143) with a partial report that the same command resumes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import warnings
from dataclasses import fields
from typing import Any, NoReturn, Optional, Union

from jsonargparse import ActionConfigFile, ArgumentParser

__all__ = ["EXIT_INVALID", "build_parser", "main", "new_spelling"]

PROG = "eval.py"
EXIT_INVALID = 3
#: Boolean options: a bare ``--overwrite`` is ``--overwrite true``, ``--no-progress`` is ``--progress false``.
BOOLEAN_OPTIONS = ("overwrite", "progress", "sanity")

#: The signal that asked this process to stop (SIGINT / SIGTERM), or None. The engine polls it
#: before every attack batch, so a stop lands within one batch with a valid partial report.
_STOP_SIGNAL: list[int | None] = [None]


def _request_stop(signum: int, _frame: Any) -> None:
    if _STOP_SIGNAL[0] is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop at once
        raise KeyboardInterrupt
    _STOP_SIGNAL[0] = signum


def _is_rank_zero() -> bool:
    """Lightning's DDP launcher re-runs this script with LOCAL_RANK set for the other ranks; torchrun
    sets RANK, SLURM sets SLURM_PROCID."""
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def _fail(message: str, code: int) -> NoReturn:
    if _is_rank_zero():
        print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def build_parser() -> ArgumentParser:
    """``--config`` / ``--print_config``, ``--ckpt`` / ``--source`` and one option per field of
    :class:`evaluation.BenchmarkOptions` (its docstring is the help); errors raise, never exit."""
    from robust_ranking.evaluation.options import BenchmarkOptions

    parser = ArgumentParser(prog=PROG, exit_on_error=False, env_prefix=False, default_env=False,
                            description="Robustness benchmark of ranker checkpoints (attack suites).")
    parser.add_argument("--config", action=ActionConfigFile,
                        help="a YAML of any of these options (e.g. from --print_config); later flags override it")
    parser.add_argument("--ckpt", type=Union[list[str], str], required=True,
                        help="checkpoint file(s): --ckpt A.ckpt B.ckpt (or a YAML list); with --source: the targets")
    parser.add_argument("--source", type=Optional[Union[list[str], str]], default=None,
                        help="transfer mode: craft the suite's CA / QA attacks on these checkpoints and measure "
                             "them on every --ckpt (ECCV 2020 Table 5 matrix)")
    parser.add_class_arguments(BenchmarkOptions, None, as_group=False, skip={"should_stop"})
    return parser


def new_spelling(argv: list[str], parser: ArgumentParser) -> list[str]:
    """The pre-jsonargparse spellings in the current one: ``--data-config`` -> ``--data_config``,
    ``--no-progress`` -> ``--progress=false``, a bare ``--overwrite`` -> ``--overwrite=true``, and
    ``--ckpt A B`` -> ``--ckpt=["A", "B"]``."""
    known = {opt for action in parser._actions for opt in action.option_strings} | {"--print_config"}
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        name, eq, value = arg.partition("=")
        if not name.startswith("--") or name == "--":
            out.append(arg)
            continue
        under = "--" + name[2:].replace("-", "_")
        if not eq and under.startswith("--no_") and under[5:] in BOOLEAN_OPTIONS:
            out.append(f"--{under[5:]}=false")
        elif not eq and under[2:] in BOOLEAN_OPTIONS and (i == len(argv) or argv[i].startswith("--")):
            out.append(f"{under}=true")
        elif not eq and under in ("--ckpt", "--source"):
            end = next((j for j in range(i, len(argv)) if argv[j].startswith("--")), len(argv))
            out += [under, *argv[i:end]] if end - i <= 1 else [f"{under}={json.dumps(argv[i:end])}"]
            i = end
        else:
            out.append((under if under in known else name) + eq + value)
    return out


def _paths(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _one_line(message: str) -> str:
    """jsonargparse's (multi-line) message on one line: ``--num_samples: invalid value 'x' (expected int)``."""
    key = re.match(r'Parser key "([^"]+)":', message)
    given = re.search(r"Given value: (.*)|Got value: (.*)", message)
    if key and given:
        types = [t if t != "NoneType" else "null" for t in re.findall(r"<class '(\w+)'>", message.split("Given")[0])]
        expected = f" (expected {' or '.join(dict.fromkeys(types))})" if types else ""
        return f"--{key.group(1)}: invalid value {(given.group(1) or given.group(2)).strip()!r}{expected}"
    if key:
        message = f"--{key.group(1)}: {message[key.end():]}"
    required = re.match(r"the following arguments are required: (.*)", message)
    if required:
        message = "the following arguments are required: " + ", ".join(
            f"--{name.strip()}" for name in required.group(1).split(","))
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> list[Any]:
    """Parse, validate, evaluate every checkpoint; returns the reports (rank 0; empty elsewhere).

    Ranking suites return :class:`evaluation.report.Report` objects; universal suites and ``--source``
    runs return their JSON data (dicts).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(new_spelling(list(sys.argv[1:] if argv is None else argv), parser))
    except Exception as err:  # jsonargparse's ArgumentError (--help / --print_config exit 0 themselves)
        _fail(_one_line(str(err)), 2)
    _STOP_SIGNAL[0] = None
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _request_stop)
    # Not news for the user: Lightning's internal deprecation, and the ranker's own NaN-metrics
    # warning (the report says which embeddings are NaN, and the exit status says it too).
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*codes are NaN / inf: every retrieval metric is NaN")
    # Under DDP: torch's deprecation inside Lightning's all_gather, and Lightning's advice to sync
    # the clean metrics, which every rank computes on the whole (gathered) gallery already.
    warnings.filterwarnings("ignore", message=r".*all_gather is deprecated")
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*when logging on epoch level")
    from robust_ranking.evaluation import BenchmarkOptions, EvaluationError, EvaluationInterrupted, InvalidInputError, benchmark
    from robust_ranking.evaluation.data import NonFiniteEmbeddingsError

    # Lightning's info lines ("GPU available ...") would drown the tables (set after Lightning's import,
    # which sets its own level).
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning_fabric").setLevel(logging.WARNING)  # "Initializing distributed: ..."
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)

    values = {f.name: args[f.name] for f in fields(BenchmarkOptions) if f.name != "should_stop"}
    options = BenchmarkOptions(**values, should_stop=lambda: _STOP_SIGNAL[0] is not None)
    try:
        run = benchmark(_paths(args.ckpt), options, source=_paths(args.source) if args.source else None)
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
    from robust_ranking.evaluation.transfer import transfer_report_markdown
    from robust_ranking.evaluation.universal import universal_markdown

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
