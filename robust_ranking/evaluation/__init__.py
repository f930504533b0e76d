"""The evaluation engine: suites, the attack registry, the engine, scores and reports (flat re-exports).

One engine serves ``eval.py`` and the :class:`callbacks.RobustnessEvaluation` callback
(docs/evaluation.md)::

    from robust_ranking.evaluation import BenchmarkOptions, Report, RobustnessEvaluator, Suite, benchmark

    # checkpoints -> reports, as eval.py does
    run = benchmark(["runs/ct/version_0/checkpoints/last.ckpt"], BenchmarkOptions(suite="configs/suites/quick.yaml"))
    print(run.results[0].report.to_markdown())

    # a model in memory
    results = RobustnessEvaluator(Suite.from_yaml("configs/suites/quick.yaml")).run(model, dm.eval_set)
    print(Report.from_results(results).to_markdown())

Modules: ``registry`` (every built-in attack, registered explicitly), ``suite``, ``engine`` (the
per-sample protocol, single process or DDP), ``universal`` and ``transfer`` (the other two
protocols), ``benchmark`` (checkpoints -> reports), ``checkpoints`` (safe loading of a run's model
and data), ``data``, ``report``, ``score``, ``options``, ``errors``.
"""

from robust_ranking.evaluation.benchmark import BenchmarkResult, BenchmarkRun, benchmark
from robust_ranking.evaluation.engine import (
    Collectives,
    ConfigResult,
    EvaluationInterrupted,
    InvalidInputError,
    RobustnessEvaluator,
    RobustnessResults,
    SanityCheck,
    SkippedAttack,
    StrategyCollectives,
)
from robust_ranking.evaluation.errors import EvaluationError
from robust_ranking.evaluation.options import BenchmarkOptions
from robust_ranking.evaluation.registry import ATTACKS, UNIVERSAL_ATTACKS, AttackEntry, AttackRegistry
from robust_ranking.evaluation.report import Report
from robust_ranking.evaluation.score import RobustnessScore
from robust_ranking.evaluation.suite import SUITE_KINDS, AttackConfig, AttackSpec, SanitySettings, Suite, SuiteError

__all__ = [
    "ATTACKS",
    "AttackConfig",
    "AttackEntry",
    "AttackRegistry",
    "AttackSpec",
    "BenchmarkOptions",
    "BenchmarkResult",
    "BenchmarkRun",
    "Collectives",
    "ConfigResult",
    "EvaluationError",
    "EvaluationInterrupted",
    "InvalidInputError",
    "Report",
    "RobustnessEvaluator",
    "RobustnessResults",
    "RobustnessScore",
    "SUITE_KINDS",
    "SanitySettings",
    "SanityCheck",
    "SkippedAttack",
    "StrategyCollectives",
    "Suite",
    "SuiteError",
    "UNIVERSAL_ATTACKS",
    "benchmark",
]
