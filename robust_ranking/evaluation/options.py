"""What a benchmark run is asked to do: plain options shared by ``eval.py`` and the Python API."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from robust_ranking import CONFIGS
from robust_ranking.evaluation.errors import EvaluationError
from robust_ranking.evaluation.suite import SUITE_KINDS, Suite, SuiteError

__all__ = ["BenchmarkOptions", "SHIPPED_SUITES", "load_suite", "resolve_suite"]


@dataclass
class BenchmarkOptions:
    """Options of a benchmark run: ``eval.py``'s options, one field each (``--<field>`` on the
    command line, ``<field>:`` in an ``eval.py --config`` YAML).

    Args:
        suite: a suite YAML (ranking or 'kind: universal') or a shipped suite's name, e.g. quick.
        num_samples: attacked samples T, overrides the suite (-1: the whole gallery).
        batch_size: attack batch size, overrides the suite.
        devices: processes (GPUs) per node; devices * num_nodes > 1 runs DDP.
        num_nodes: machines of a multi-node DDP run (launched by torchrun or SLURM, see docs/evaluation.md).
        accelerator: cpu, gpu or auto (the GPU when there is one, else the CPU, DDP over gloo).
        strategy: Lightning strategy of the per-sample runner; auto is ddp when devices * num_nodes > 1.
        precision: Lightning precision of the per-sample runner: 32-true, 16-mixed (GPU) or bf16-mixed.
        data_config: a data config instead of each checkpoint's <run>/config.yaml.
        output_dir: where to write the reports instead of <run>/robustness/.
        progress: progress bars and status lines on stderr (rank 0).
        overwrite: recompute even if a finished or partial report of this checkpoint and suite exists.
        sanity: run the suite's large-budget sanity checks (see docs/reliability.md).
        gallery_size: transfer only: a seeded random subset of G items of X as every model's gallery.
        should_stop: (Python only) polled before every attack batch (ranking) or configuration
            (universal, transfer); True stops the run with evaluation.EvaluationInterrupted.
    """

    suite: str
    num_samples: int | None = None
    batch_size: int | None = None
    devices: int = 1
    num_nodes: int = 1
    accelerator: str = "auto"
    strategy: str = "auto"
    precision: str | int = "32-true"
    data_config: str | None = None
    output_dir: str | None = None
    progress: bool = True
    overwrite: bool = False
    sanity: bool = True
    gallery_size: int | None = None
    should_stop: Callable[[], bool] | None = None

    def stop_requested(self) -> bool:
        return self.should_stop is not None and bool(self.should_stop())

    @property
    def device(self) -> torch.device:
        """The device of the single-process runners (universal, transfer)."""
        use_gpu = self.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        return torch.device("cuda" if use_gpu else "cpu")


#: The suites shipped with the project; ``--suite quick`` is ``configs/suites/quick.yaml``.
SHIPPED_SUITES = CONFIGS / "suites"


def resolve_suite(name_or_path: str | Path) -> Path:
    """A suite file: the path itself, or a shipped suite's name (``quick`` -> ``configs/suites/quick.yaml``)."""
    path = Path(name_or_path)
    if path.is_file() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    shipped = SHIPPED_SUITES / f"{path.name}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in SHIPPED_SUITES.glob("*.yaml")))
    raise EvaluationError(f"unknown suite {str(name_or_path)!r}: give a suite file, or one of the shipped suites: {names}")


def load_suite(options: BenchmarkOptions) -> Any:
    """The suite of ``options.suite`` (a file or a shipped suite's name, ranking or universal) with the
    overrides; raise :class:`EvaluationError`."""
    try:
        suite = Suite.from_yaml(resolve_suite(options.suite), kinds=SUITE_KINDS)
        sanity = False if not options.sanity and suite.kind == "ranking" else None
        return suite.with_overrides(num_samples=options.num_samples, batch_size=options.batch_size, sanity=sanity)
    except SuiteError as err:
        raise EvaluationError(str(err)) from None
