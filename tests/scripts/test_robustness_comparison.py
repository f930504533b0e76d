"""scripts/robustness_comparison.py: merging reports of one checkpoint and comparing checkpoints."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from run_helpers import REPO

# The script, imported by file path (scripts/ is not a package and is not put on sys.path).
_SPEC = importlib.util.spec_from_file_location(
    "robustness_comparison", REPO / "scripts" / "robustness_comparison.py")
robustness_comparison = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(robustness_comparison)


def _report(path: Path, rows: list[dict], indices: list[int]) -> Path:
    data = {
        "format": "robust-ranking/robustness-report/v1", "title": path.stem, "checkpoint": None,
        "suite": {"name": "s"}, "suite_file": None, "seed": 0, "world_size": 1, "gallery_size": 100,
        "num_samples": len(indices), "clean": {"recall@1": 0.9, "map": 0.8}, "robustness_score": None,
        "score_per_attack": {}, "results": rows, "skipped": [], "wall_s": 1.0, "embed_wall_s": 0.1,
        "attacked_indices": indices,
    }
    path.write_text(json.dumps(data))
    return path


def _row(attack: str, eps: float, mean: float, clean: float, direction: str, size: int = 1) -> dict:
    key = "w" if attack.startswith("CA") else "m"
    return {"attack": attack, "eps": eps, key: size, "size_key": key, "metric": "rank", "mean": mean,
            "std": 0.0, "T": 2, "wall_s": 0.1, "clean": clean, "direction": direction, "hparams": {}}


def test_later_report_replaces_the_same_configuration_and_rescores(tmp_path: Path) -> None:
    first = _report(tmp_path / "a.json", [_row("CA+", 0.1, 10.0, 50.0, "+"), _row("QA+", 0.1, 5.0, 50.0, "+")], [3, 7])
    second = _report(tmp_path / "b.json", [_row("QA+", 0.1, 25.0, 50.0, "+")], [3, 7])
    merged = robustness_comparison.merge_reports("M", [first, second])
    by_attack = {r["attack"]: r["mean"] for r in merged.data["results"]}
    assert by_attack == {"CA+": 10.0, "QA+": 25.0}
    # score terms: CA+ 10/50 = 0.2, QA+ 25/50 = 0.5 -> mean 0.35
    assert merged.data["robustness_score"] == pytest.approx(0.35)
    assert merged.data["score_per_attack"] == pytest.approx({"CA+": 0.2, "QA+": 0.5})


def test_merging_reports_of_other_samples_is_refused(tmp_path: Path) -> None:
    first = _report(tmp_path / "a.json", [_row("CA+", 0.1, 10.0, 50.0, "+")], [3, 7])
    second = _report(tmp_path / "b.json", [_row("CA+", 0.1, 20.0, 50.0, "+")], [3, 8])
    with pytest.raises(SystemExit, match="other samples"):
        robustness_comparison.merge_reports("M", [first, second])


def test_side_by_side_table_has_one_block_per_label(tmp_path: Path) -> None:
    a = _report(tmp_path / "a.json", [_row("CA+", 0.1, 10.0, 50.0, "+")], [1])
    b = _report(tmp_path / "b.json", [_row("CA+", 0.1, 40.0, 50.0, "+")], [1])
    out = tmp_path / "cmp.md"
    text = robustness_comparison.main([f"vanilla={a}", f"defended={b}", "--output", str(out)])
    assert out.read_text() == text
    assert "**vanilla**" in text and "**defended**" in text
    assert "| 0.1 | 10.0 |" in text and "| 0.1 | 40.0 |" in text
