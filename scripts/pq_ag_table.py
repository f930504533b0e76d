"""PQ-AG tables (Feng et al., AAAI 2020) from eval.py reports: the white-box table (Table 1 layout),
per attack the sub-codes changed and the feature shift, and the transfer matrices (Tables 3 / 4).

    # white-box: one report per model (configs/suites/pqag_table.yaml)
    python eval.py --ckpt runs/fashion_mnist_dpqn_24bit/version_0/checkpoints/last.ckpt \
        --suite configs/suites/pqag_table.yaml
    # transfer: AOD crafted on each --source, measured on each --ckpt (configs/suites/pqag_transfer.yaml)
    python eval.py --source A.ckpt B.ckpt --ckpt A.ckpt B.ckpt --suite configs/suites/pqag_transfer.yaml \
        --output-dir runs/pq_transfer
    # the tables
    python scripts/pq_ag_table.py 24bit=runs/fashion_mnist_dpqn_24bit/version_0/robustness/last.json \
        --transfer runs/pq_transfer/transfer_pqag_transfer.json

White-box rows: SDC and ADC x Clean / Basic / APD / AOD (the attacks the reports hold); columns: the
given reports; cells: mAP x 100 over the attacked queries (the means of the per-query ``ap_sdc`` /
``ap_adc`` the engine gathered; Clean = their clean values). Then per model and attack the engine's
per-query means ``code_change`` (fraction of the M query sub-codes changed) / ``feature_shift``
(``||F(y^) - F(y)||^2``), and the clean soft assignment's mean peak probability (AOD's target).
Transfer: one matrix per PQ-AG configuration of each transfer report, rows crafted on, columns
attacked, cells SDC / ADC mAP x 100 (the diagonal is the white-box attack).

This script only reads reports: every number comes from the evaluation engine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ATTACKS = (("Basic", "PQ-AG:Basic"), ("APD", "PQ-AG:APD"), ("AOD", "PQ-AG:AOD"))


def load_report(path: str | Path) -> dict[str, dict[str, Any]]:
    """The PQ-AG results of an eval.py report, by attack name (one epsilon per attack: the first)."""
    with open(path) as f:
        data = json.load(f)
    results: dict[str, dict[str, Any]] = {}
    for r in data.get("results", []):
        if r.get("attack", "").startswith("PQ-AG:"):
            results.setdefault(r["attack"], r)
    if not results:
        raise SystemExit(f"error: {path} has no PQ-AG results (run configs/suites/pqag_table.yaml)")
    return results


def parse_reports(items: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``["LABEL=report.json", ...]`` -> label -> attack -> result row."""
    columns = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"error: want LABEL=REPORT.json, got {item!r}")
        columns[label] = load_report(path)
    return columns


def white_box_table(columns: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """The AAAI 2020 Table 1 layout: SDC / ADC x Clean and every attack all reports hold."""
    attacks = [(row, name) for row, name in ATTACKS if all(name in results for results in columns.values())]
    if not attacks:
        raise SystemExit("error: the reports share no PQ-AG attack")
    lines = [f"| | | {' | '.join(columns)} |", f"| --- | --- |{' --- |' * len(columns)}"]
    for mode in ("sdc", "adc"):
        for row, name in [("Clean", None), *attacks]:
            cells = []
            for results in columns.values():
                r = results[name or attacks[0][1]]
                value = (r["clean"] if mode == "sdc" else r["ap_adc_clean"]) if name is None else (
                    r["mean"] if mode == "sdc" else r["ap_adc"])
                cells.append(f"{100 * value:.1f}")
            lines.append(f"| {mode.upper() if name is None else ''} | {row} | {' | '.join(cells)} |")
    return lines


def _number(r: dict[str, Any], key: str) -> str:
    value = r.get(key)
    return "n/a" if value is None else f"{value:.3f}"


def shift_table(columns: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Per model: code change / feature shift of each attack, and the clean peak probability."""
    attacks = [(row, name) for row, name in ATTACKS if any(name in results for results in columns.values())]
    lines = ["| model | " + " | ".join(f"{row} code change / feature shift" for row, _ in attacks)
             + " | clean peak probability |", "| --- |" + " --- |" * (len(attacks) + 1)]
    for label, results in columns.items():
        cells = [f"{_number(results[name], 'code_change')} / {_number(results[name], 'feature_shift')}"
                 if name in results else "" for _, name in attacks]
        first = next(iter(results.values()))
        lines.append(f"| {label} | {' | '.join(cells)} | {_number(first, 'peak_probability_clean')} |")
    return lines


def transfer_tables(path: str | Path) -> list[str]:
    """One matrix per PQ-AG configuration of an eval.py transfer report (rows crafted on, columns attacked)."""
    with open(path) as f:
        data = json.load(f)
    lines: list[str] = []
    rows = [r for r in data.get("results", []) if r.get("attack", "").startswith("PQ-AG:")]
    if not rows:
        raise SystemExit(f"error: {path} has no PQ-AG transfer results (run configs/suites/pqag_transfer.yaml)")
    for row in rows:
        matrix = row["matrix"]
        targets = list(next(iter(matrix.values())))
        # The clean mAP of a target does not depend on the source (the same clean queries).
        clean = {t: next(cells[t] for cells in matrix.values()) for t in targets}
        lines += [f"{row['attack']} transfer, eps = {row['eps']:g} (rows: crafted on; columns: attacked; "
                  f"SDC / ADC mAP x 100, {row.get('num_queries', data.get('num_samples'))} queries)", "",
                  f"| crafted on \\ attacked | {' | '.join(targets)} |", f"| --- |{' --- |' * len(targets)}",
                  "| Clean | " + " | ".join(f"{100 * clean[t]['ap_sdc_clean']:.1f} / {100 * clean[t]['ap_adc_clean']:.1f}"
                                          for t in targets) + " |"]
        for source, cells in matrix.items():
            lines.append(f"| {source} | " + " | ".join(
                f"{100 * cells[t]['ap_sdc']:.1f} / {100 * cells[t]['ap_adc']:.1f}" for t in targets) + " |")
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="*", help="LABEL=<eval.py report JSON> of the pqag_table suite")
    parser.add_argument("--transfer", nargs="+", default=[], metavar="JSON",
                        help="eval.py transfer reports (transfer_<suite>.json) of the pqag_transfer suite")
    args = parser.parse_args(argv)
    if not args.reports and not args.transfer:
        parser.error("give LABEL=REPORT.json reports and / or --transfer reports")
    lines: list[str] = []
    if args.reports:
        columns = parse_reports(args.reports)
        lines += [*white_box_table(columns), "", *shift_table(columns), ""]
    for path in args.transfer:
        lines += transfer_tables(path)
    text = "\n".join(lines).rstrip() + "\n"
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
