"""SDHA's Tables 2, 3 and 4 (Lu et al., ICMR 2021, Sec. 5) from eval.py reports with traces.

The attacks run in the engine: ``eval.py --ckpt <DCH checkpoint> --suite <suite with traces: true>``
(``configs/suites/sdha_tables_untargeted.yaml``, ``configs/suites/sdha_tables_targeted.yaml``; one
report per checkpoint, i.e. per code length) records, for every attack, each query's AP@topk and
perturbation l2 every ``check_every`` iterations (the result row's ``trace``, with the per-query
metrics, the tanh scale factor and the model's ``hash_bits``). This script only reads those
reports and prints, from the traces (:class:`attacks.AttackTrace`):

- untargeted table (paper Table 2): the mean l2 when the workload's mAP first reaches
  ``<= --untargeted-map`` (0.1), ``*`` = never reached (final l2 shown, the paper underlines);
- targeted table (Table 3): the same for mAP ``>= --targeted-map`` w.r.t. the target labels;
- Table 4 (largest code length): mAP when the mean l2 first reaches each budget, and the final
  mAP / l2;
- the mAP after the attacks, and the l2 reductions of SDHA vs HAG / DHTA averaged over code lengths.

::

    OMP_NUM_THREADS=1 .venv/bin/python eval.py --ckpt runs/fashion_mnist_dch_64/version_0/checkpoints/last.ckpt \
        --suite configs/suites/sdha_tables_untargeted.yaml --output-dir runs/sdha/reports/64
    .venv/bin/python scripts/sdha_tables.py runs/sdha/reports/*/*.sdha_tables_untargeted.json

Several reports are merged per code length (later ones win per attack). ``--from-json`` also reads
the results files of the earlier, script-run tables (``{bits: {attack: {iterations, ap, l2, ...}}}``,
``runs/sdha/*.json``); ``--json`` writes the merged results in that format.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from robust_ranking.attacks import AttackTrace

UNTARGETED = ("SDHA", "SDHA-UW", "HAG")
TARGETED = ("SDHA-T", "SDHA-UW-T", "DHTA")


def _mean32(values: list[float]) -> float:
    """The float32 mean the attack's per-query values had (they are float32 tensors)."""
    return float(torch.tensor(values, dtype=torch.float32).mean())


def entry_of(row: dict[str, Any]) -> dict[str, Any]:
    """One report row with a ``trace`` as a results entry: hparams, per-query traces and iteration counts."""
    trace = row["trace"]
    per_sample = trace.get("per_sample", {})
    iterations = per_sample["iterations"]
    spent = per_sample.get("search_iterations", iterations)  # SDHA's search: iterations over all its runs
    return {"targeted": trace["targeted"],
            "hparams": {"attack": row["attack"], "eps": row["eps"], **row["hparams"]}, "seconds": row.get("wall_s"),
            "tanh_scale_factor": trace["tanh_scale_factor"], "mean_iterations": _mean32(iterations),
            "mean_search_iterations": _mean32(spent),
            "lagrange": per_sample["lagrange"] if "lagrange" in per_sample else None,
            "iterations": trace["iterations"], "ap": trace["ap"], "l2": trace["l2"]}


def results_of(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{bits: {"ckpt": ..., attack: entry}}`` of one eval.py report (rows with traces), or of a
    results file of the earlier script-run tables (returned as it is)."""
    if "results" not in data or not isinstance(data["results"], list):
        return data  # {bits: {attack: entry}}: the earlier format
    out: dict[str, dict[str, Any]] = {}
    for row in data["results"]:
        trace = row.get("trace")
        if not trace or row.get("invalid"):
            continue
        bits = str(trace.get("hash_bits"))
        entry = out.setdefault(bits, {"ckpt": data.get("checkpoint")})
        entry[row["attack"]] = entry_of(row)
    return out


def load_results(paths: list[str | Path]) -> dict[str, dict[str, Any]]:
    """The merged results of report / results files (later files win per code length and attack)."""
    results: dict[str, dict[str, Any]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        found = results_of(data)
        if not found:
            raise SystemExit(f"sdha_tables.py: error: {path} has no attack traces (run a suite with traces: true, "
                             "e.g. configs/suites/sdha_tables_untargeted.yaml)")
        for bits, entry in found.items():
            results.setdefault(bits, {}).update(entry)
    return results


def trace_of(item: dict[str, Any]) -> AttackTrace:
    return AttackTrace(torch.tensor(item["iterations"]), torch.tensor(item["ap"]), torch.tensor(item["l2"]),
                       item["targeted"])


def fmt_l2(value: tuple[float, bool]) -> str:
    return f"{value[0]:.3f}" + ("" if value[1] else "*")


def print_tables(results: dict[str, Any], args: argparse.Namespace) -> None:
    bits = sorted(results, key=int)
    head = "| attack | " + " | ".join(f"k = {b}" for b in bits) + " |"
    rule = "| --- |" + " --- |" * len(bits)

    def l2_table(names: tuple[str, ...], bound: float, title: str, best: bool) -> dict[str, list[float]]:
        print(f"\n{title}\n\n{head}\n{rule}")
        values: dict[str, list[float]] = {}
        for name in names:
            cells, vals = [], []
            for b in bits:
                item = results[b].get(name)
                if item is None:
                    cells.append("-")
                    continue
                trace = trace_of(item)
                v = trace.min_l2_at_map(bound) if best else trace.l2_at_map(bound)
                cells.append(fmt_l2(v))
                vals.append(v[0])
            values[name] = vals
            print(f"| {name} | " + " | ".join(cells) + " |")
        return values

    def reductions(table: dict[str, list[float]], pairs: tuple[tuple[str, str], ...], what: str) -> None:
        for mine, base in pairs:
            if table.get(mine) and table.get(base) and len(table[mine]) == len(table[base]):
                red = [1 - a / b for a, b in zip(table[mine], table[base]) if b > 0]
                print(f"\n{mine} vs {base} ({what}): l2 {100 * sum(red) / len(red):.1f}% smaller on average "
                      "over code lengths")

    print("\nClean mAP@1000 of the attacked workload (w.r.t. the query labels / the target labels)\n\n"
          + head + "\n" + rule)
    for label, names in (("query labels", UNTARGETED), ("target labels", TARGETED)):
        cells = []
        for b in bits:
            first = next((results[b][n] for n in names if n in results[b]), None)
            cells.append("-" if first is None else f"{float(torch.tensor(first['ap'])[:, 0].mean()):.4f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    for best, what in ((False, "first check past the preset"), (True, "smallest over the checks past the preset")):
        u = l2_table(UNTARGETED, args.untargeted_map, f"Untargeted (Table 2): mean l2 when mAP <= {args.untargeted_map}, "
                     f"{what} (* = never; final l2)", best)
        reductions(u, (("SDHA", "HAG"), ("SDHA-UW", "HAG"), ("SDHA", "SDHA-UW")), what)
        t = l2_table(TARGETED, args.targeted_map, f"Targeted (Table 3): mean l2 when target mAP >= {args.targeted_map}, "
                     f"{what} (* = never; final l2)", best)
        reductions(t, (("SDHA-T", "DHTA"), ("SDHA-UW-T", "DHTA"), ("SDHA-T", "SDHA-UW-T")), what)

    print("\nmAP after the attack / mean l2 / mean iterations per query\n\n" + head + "\n" + rule)
    for name in UNTARGETED + TARGETED:
        cells = []
        for b in bits:
            item = results[b].get(name)
            if item is None:
                cells.append("-")
                continue
            m, l2 = trace_of(item).final()
            cells.append(f"{m:.3f} / {l2:.3f} / {item['mean_iterations']:.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")

    top = bits[-1]
    for names, budgets, kind in ((UNTARGETED, args.budgets_untargeted, "Untargeted"),
                                 (TARGETED, args.budgets_targeted, "Targeted")):
        print(f"\n{kind} (Table 4 layout), k = {top}: mAP at mean l2 budgets, final mAP / l2\n")
        print("| attack | " + " | ".join(f"l2 = {b}" for b in budgets) + " | final mAP / l2 |")
        print("| --- |" + " --- |" * (len(budgets) + 1))
        for name in names:
            item = results[top].get(name)
            if item is None:
                continue
            trace = trace_of(item)
            m, l2 = trace.final()
            print(f"| {name} | " + " | ".join(f"{trace.map_at_l2(b):.3f}" for b in budgets) + f" | {m:.3f} / {l2:.3f} |")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="*", default=[],
                        help="eval.py reports of suites with traces: true (one per code length; merged)")
    parser.add_argument("--from-json", nargs="+", default=[],
                        help="more reports, or results files of the earlier script-run tables (merged)")
    parser.add_argument("--json", default=None, help="write the merged results ({bits: {attack: ...}}) here")
    parser.add_argument("--untargeted-map", type=float, default=0.1)
    parser.add_argument("--targeted-map", type=float, default=0.9)
    parser.add_argument("--budgets-untargeted", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--budgets-targeted", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    args = parser.parse_args(argv)
    paths = [*args.reports, *args.from_json]
    if not paths:
        parser.error("give eval.py reports (suites with traces: true) or --from-json results files")
    for path in paths:
        if not Path(path).is_file():
            parser.error(f"no such file: {path}")
    if not math.isfinite(args.untargeted_map):
        parser.error("--untargeted-map must be finite")
    results = load_results(paths)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results))
    print_tables(results, args)
    return results


if __name__ == "__main__":
    main()
