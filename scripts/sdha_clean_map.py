"""SDHA Table 1 (clean Hamming retrieval of DCH models, query / database protocol) from eval.py reports.

The metrics are computed by the engine: ``eval.py --ckpt <DCH checkpoint> --suite <a hashing suite>``
on a run whose data has a query / database split (``configs/data/fashion_mnist_hashing.yaml``: the
1,000 test queries against the 60,000 training images) writes, once per report, the section
``clean_query_database`` (``evaluation.engine.clean_query_database_metrics``: every query against
the database, Hamming ranking with ties broken by database index): mAP@1000 (SDHA / HAG), mAP over
the whole ranking, mAP and precision within Hamming radius 2 (DCH), and the precision-recall curve
over Hamming radii. This script only reads those reports and prints the table, one row per report
(per code length)::

    OMP_NUM_THREADS=1 .venv/bin/python eval.py --ckpt runs/fashion_mnist_dch_64/version_0/checkpoints/last.ckpt \\
        --suite configs/suites/sdha_tables_untargeted.yaml --output-dir runs/sdha/reports/64
    .venv/bin/python scripts/sdha_clean_map.py runs/sdha/reports/*/*.sdha_tables_untargeted.json

Reports without a hashing ``clean_query_database`` section (other rankers, a gallery-protocol data
module, reports written before the section existed) are named on stderr and left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = ("map@1000", "map", "map@H<=2", "precision@H<=2")


def row_of(data: dict[str, Any], path: str | Path) -> dict[str, Any] | None:
    """The Table 1 row of one report (``None`` without a hashing ``clean_query_database``)."""
    section = data.get("clean_query_database")
    if not isinstance(section, dict) or section.get("family") != "hashing":
        return None
    return {"report": str(path), "ckpt": data.get("checkpoint"), "bits": section.get("bits"),
            "queries": section.get("queries"), "database": section.get("database"),
            **{k: v for k, v in section.items() if k not in ("family", "bits", "queries", "database")}}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", help="eval.py JSON reports of DCH checkpoints")
    parser.add_argument("--json", default=None, help="write the rows (with the PR curves) to this file")
    args = parser.parse_args(argv)
    rows = []
    for path in args.reports:
        row = row_of(json.loads(Path(path).read_text()), path)
        if row is None:
            print(f"{path}: no hashing clean_query_database section (not a DCH report on a query / database "
                  "split?): left out", file=sys.stderr)
            continue
        rows.append(row)
    if not rows:
        raise SystemExit("error: no report with a hashing clean_query_database section")
    rows.sort(key=lambda r: (r["bits"] is None, r["bits"] or 0))  # stable: same bits keep their order
    print("| bits | mAP@1000 | mAP (all) | mAP@H<=2 | P@H<=2 | queries x database | checkpoint |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        values = " | ".join("–" if r.get(k) is None else f"{r[k]:.4f}" for k in COLUMNS)
        print(f"| {r['bits']} | {values} | {r['queries']} x {r['database']} | {r['ckpt'] or r['report']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
