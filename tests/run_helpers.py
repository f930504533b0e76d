"""Helpers of the tests that train a tiny run with train.py and evaluate it with eval.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import train


def train_in(root: Path, args: list[str]) -> None:
    """``train.py <args>`` with ``root`` as the working directory, so ``runs/`` lands there."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        train.main(args)
    finally:
        os.chdir(cwd)


def report_numbers(report: dict[str, Any]) -> dict[str, Any]:
    """An eval.py report without its wall times (which differ from run to run)."""
    results = [{k: v for k, v in r.items() if k != "wall_s"} for r in report["results"]]
    return {"results": results, "clean": report["clean"], "score": report["robustness_score"],
            "T": report["num_samples"], "indices": report["attacked_indices"]}
