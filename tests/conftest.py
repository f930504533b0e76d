"""Shared fixtures: a tiny ranker trained for a moment on synthetic data (``tiny_ranker``) and a tiny
``train.py`` run (``tiny_run``); the helpers behind them are in ``run_helpers``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from run_helpers import TinyRanker, train_tiny_ranker, train_tiny_run


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regenerate-golden", default=None, metavar="NAMES",
                     help="rewrite tests/golden/<name>.json for these comma-separated families ('all': every one) "
                          "in tests/evaluation/test_golden_numbers.py; only when a change is meant to alter numbers")


def pytest_configure(config: pytest.Config) -> None:
    # Tests run tiny tensors on a shared 2-core runner: extra intra-op threads only contend. Set
    # here, before any fixture trains a model, and re-asserted before every test below.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    """One intra-op thread per test: Lightning's DDP launchers raise the count in the launching
    process, so a test after one of them must not inherit it."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_ranker() -> TinyRanker:
    return train_tiny_ranker()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    """A tiny ranker trained by ``train.py`` (:func:`run_helpers.train_tiny_run`), once per module."""
    return train_tiny_run(tmp_path_factory.mktemp("tiny_run"))
