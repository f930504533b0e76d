"""The evaluation engine: suites, the attack registry, the engine, scores and reports (flat re-exports).

One engine serves ``eval.py`` and the :class:`callbacks.RobustnessEvaluation` callback
(docs/evaluation.md)::

    from evaluation import Report, RobustnessEvaluator, Suite

    results = RobustnessEvaluator(Suite.from_yaml("configs/suites/quick.yaml")).run(model, dm.eval_set)
    print(Report.from_results(results).to_markdown())
"""

from evaluation.engine import (
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
from evaluation.registry import ATTACKS, UNIVERSAL_ATTACKS, AttackEntry, AttackRegistry
from evaluation.report import Report
from evaluation.score import RobustnessScore
from evaluation.suite import SUITE_KINDS, AttackConfig, AttackSpec, SanitySettings, Suite, SuiteError

__all__ = [
    "ATTACKS",
    "AttackConfig",
    "AttackEntry",
    "AttackRegistry",
    "AttackSpec",
    "Collectives",
    "ConfigResult",
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
]
