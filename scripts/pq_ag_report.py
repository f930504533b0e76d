"""The PQ-AG table (AAAI 2020 Table 1 layout) from eval.py reports of ``configs/suites/pqag_table.yaml``.

    python scripts/pq_ag_report.py 16bit=runs/fashion_mnist_dpqn_16bit/version_0/robustness/last.json \
        24bit=runs/fashion_mnist_dpqn_24bit/version_0/robustness/last.json

Rows: SDC and ADC x Clean / Basic / APD / AOD; columns: the given reports; cells: mAP x 100 over
the attacked queries (the means of the per-query ``ap_sdc`` / ``ap_adc`` the engine gathered).
"""

from __future__ import annotations

import argparse
import json

ROWS = (("Clean", None), ("Basic", "PQ-AG:Basic"), ("APD", "PQ-AG:APD"), ("AOD", "PQ-AG:AOD"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="LABEL=<eval.py JSON report>")
    args = parser.parse_args()
    columns = {}
    for item in args.reports:
        label, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"error: want LABEL=REPORT.json, got {item!r}")
        with open(path) as f:
            results = {r["attack"]: r for r in json.load(f)["results"]}
        missing = {a for _, a in ROWS if a is not None} - set(results)
        if missing:
            raise SystemExit(f"error: {path} has no results for {sorted(missing)} (run the pqag_table suite)")
        columns[label] = results
    print(f"| | | {' | '.join(columns)} |")
    print(f"| --- | --- |{' --- |' * len(columns)}")
    for mode in ("sdc", "adc"):
        for row, attack in ROWS:
            cells = []
            for results in columns.values():
                r = results[attack or "PQ-AG:Basic"]
                value = (r["clean"] if mode == "sdc" else r["ap_adc_clean"]) if attack is None else (
                    r["mean"] if mode == "sdc" else r["ap_adc"])
                cells.append(f"{100 * value:.1f}")
            print(f"| {mode.upper() if attack is None else ''} | {row} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
