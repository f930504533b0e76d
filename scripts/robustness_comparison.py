"""Side-by-side robustness table (ECCV 2020 Table 3 layout) from existing ``eval.py`` reports.

``eval.py --ckpt a.ckpt b.ckpt --suite S`` writes ``comparison.md`` itself; this script builds the
same table from reports that already exist, so a checkpoint evaluated earlier is not attacked
again. A column may merge several reports of one checkpoint (``+``-separated): a later report's
results replace an earlier one's for the same (attack, eps, w / m), e.g. a re-run of the QA
entries after a change of the QA loss. The merged parts must have attacked the same samples.

    python scripts/robustness_comparison.py --output runs/comparison_ct_ctd.md \\
        CT=runs/fashion_mnist_ct/version_0/robustness_T250/a.json+runs/fashion_mnist_ct/version_0/robustness_T250_qa_mean/a.json \\
        CTD=runs/fashion_mnist_ctd/version_0/robustness_T250/last.json

The robustness score of a merged column is recomputed from its merged results.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from robust_ranking.evaluation.report import Report, write_atomic
from robust_ranking.evaluation.score import RobustnessScore


def _key(row: dict[str, Any]) -> tuple[str, float, Any]:
    size_key = row.get("size_key")
    return row["attack"], float(row["eps"]), row.get(size_key) if size_key else None


def merge_reports(label: str, paths: list[Path]) -> Report:
    """One report holding the results of ``paths`` (later files win on the same configuration)."""
    base = Report.load(paths[0]).data
    merged: dict[tuple[str, float, Any], dict[str, Any]] = {_key(r): r for r in base["results"]}
    for path in paths[1:]:
        other = Report.load(path).data
        if other.get("attacked_indices") != base.get("attacked_indices"):
            raise SystemExit(f"robustness_comparison.py: error: {path} attacked other samples than {paths[0]}")
        for row in other["results"]:
            merged[_key(row)] = row
    data = dict(base)
    data["results"] = list(merged.values())
    data["title"] = label
    data["sources"] = [str(p) for p in paths]
    score = RobustnessScore.from_results(
        SimpleNamespace(attack=r["attack"], eps=r["eps"], mean=r["mean"], clean=r.get("clean"),
                        direction=r.get("direction"), invalid=r.get("invalid"))
        for r in data["results"]
    )
    data["robustness_score"], data["score_per_attack"] = score.value, score.per_attack
    data["score_invalid"] = score.invalid
    return Report(data)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("columns", nargs="+", help="LABEL=<report.json>[+<report.json>...]")
    parser.add_argument("--output", type=Path, default=None, help="write the Markdown here (default: print)")
    parser.add_argument("--title", default="Robustness comparison")
    args = parser.parse_args(argv)
    reports = []
    for item in args.columns:
        label, sep, spec = item.partition("=")
        if not sep or not spec:
            parser.error(f"expected LABEL=<report.json>, got {item!r}")
        paths = [Path(p) for p in spec.split("+")]
        for path in paths:
            if not path.is_file():
                parser.error(f"no such report: {path}")
        reports.append(merge_reports(label, paths))
    text = Report.comparison_markdown(reports, title=args.title)
    if args.output is None:
        print(text)
    else:
        write_atomic(args.output, text)
        print(f"wrote {args.output}")
    return text


if __name__ == "__main__":
    main()
