"""Adversarial robustness of deep image retrieval, on PyTorch Lightning.

Sub-packages: :mod:`robust_ranking.lightning_modules` (rankers and backbones),
:mod:`robust_ranking.data` (data modules), :mod:`robust_ranking.retrieval` (metrics and search),
:mod:`robust_ranking.attacks` (attack algorithms), :mod:`robust_ranking.callbacks` (defenses and
in-training robustness), :mod:`robust_ranking.evaluation` (the benchmarking engine),
:mod:`robust_ranking.cli` (the ``train`` and ``eval`` programs). The shipped configs and suites
are in ``robust_ranking/configs`` (``configs/`` in a checkout).
"""

from pathlib import Path

__version__ = "0.2.0"

#: The shipped configs and suites (``configs/`` in a checkout, installed with the package).
CONFIGS = Path(__file__).resolve().parent / "configs"
