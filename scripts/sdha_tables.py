"""SDHA's experiment (Lu et al., ICMR 2021, Sec. 5) on DCH checkpoints: Tables 2, 3 and 4.

For every checkpoint (one per code length) the query workload -- ``--queries`` queries drawn with
``--seed`` from the run's 1,000 test queries (the paper reserves 100) -- is attacked in batches
by SDHA, SDHA-UW and HAG (untargeted) and SDHA, SDHA-UW and DHTA (targeted, a random target
label per query, the same for the three), each recording per-query AP@1000 and l2 every
``--check-every`` iterations. From these traces (:class:`attacks.AttackTrace`):

- untargeted table (paper Table 2): the mean l2 when the workload's mAP first reaches
  ``<= --untargeted-map`` (0.1), ``*`` = never reached (final l2 shown, the paper underlines);
- targeted table (Table 3): the same for mAP ``>= --targeted-map`` w.r.t. the target labels;
- Table 4 (largest code length): mAP when the mean l2 first reaches each budget, and the final
  mAP / l2;
- the mAP after the attacks, and the l2 reductions of SDHA vs HAG / DHTA averaged over code lengths.

Results are merged into ``--out`` (JSON, traces included) so runs can be split over invocations
(``--attacks``), and ``--from-json`` re-prints the tables without attacking::

    nice -n 10 .venv/bin/python scripts/sdha_tables.py --ckpt runs/fashion_mnist_dch_{16,32,48,64}/version_0/checkpoints/last.ckpt \\
        --out runs/sdha/tables.json
    .venv/bin/python scripts/sdha_tables.py --from-json runs/sdha/tables.json

Several ``--from-json`` files are merged (e.g. one per code length, run as separate processes).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from sdha_common import encode_set, images_of, load_run  # noqa: I001  (sets up sys.path)
from attacks import AttackTrace, DHTAAttack, Gallery, HAGAttack, HashingAttack, SDHAAttack
from attacks.hashing.hashing_attack import logit_scale_factor, scaled_tanh_scales

UNTARGETED = ("SDHA", "SDHA-UW", "HAG")
TARGETED = ("SDHA-T", "SDHA-UW-T", "DHTA")


def build_attacks(args: argparse.Namespace, tanh_scale_factor: float = 1.0) -> dict[str, HashingAttack]:
    common = {"eps": args.eps, "check_every": args.check_every, "topk": args.topk, "seed": args.seed,
              "tanh_scales": scaled_tanh_scales(tanh_scale_factor)}
    # goal_ap (the per-query stopping bound) is the same for an attack and its baseline.
    untargeted = {**common, "goal_ap": args.goal_ap_untargeted}
    targeted = {**common, "goal_ap": args.goal_ap_targeted}
    sdha = {"steps": args.steps, "lr": args.lr, "search_steps": args.search_steps}
    lag_u, lag_t = args.lagrange, args.lagrange_targeted or args.lagrange
    return {
        "SDHA": SDHAAttack(lagrange=lag_u, **sdha, **untargeted),
        "SDHA-UW": SDHAAttack(z=0.0, lagrange=lag_u, **sdha, **untargeted),
        "HAG": HAGAttack(lr=args.hag_lr, steps=args.baseline_steps, **untargeted),
        "SDHA-T": SDHAAttack(True, "random", lagrange=lag_t, **sdha, **targeted),
        "SDHA-UW-T": SDHAAttack(True, "random", z=0.0, lagrange=lag_t, **sdha, **targeted),
        "DHTA": DHTAAttack("random", lr=args.dhta_lr, steps=args.baseline_steps, **targeted),
    }


def _scale_factor(text: str) -> float | str:
    if text == "auto":
        return text
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be > 0 or 'auto', got {text!r}")
    return value


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    for ckpt in args.ckpt:
        model, dm = load_run(ckpt)
        for p in model.parameters():
            p.requires_grad_(False)
        bits = str(model.hash_bits)
        db_codes, db_labels = encode_set(model, dm.database_set)
        gallery = Gallery(db_codes, db_labels)
        perm = torch.randperm(len(dm.query_set), generator=torch.Generator().manual_seed(args.seed))
        workload = perm[: args.queries].sort().values
        images, labels = images_of(dm.query_set, workload)
        # One factor per model and workload, for every attack alike (see logit_scale_factor).
        factor = logit_scale_factor(model, images) if args.tanh_scale_factor == "auto" else float(args.tanh_scale_factor)
        print(f"[{bits} bits] tanh scale factor {factor:.4g} ({args.tanh_scale_factor})", flush=True)
        attacks = build_attacks(args, factor)
        names = args.attacks or list(attacks)
        entry = results.setdefault(bits, {})
        entry["ckpt"] = str(ckpt)
        for name in names:
            attack = attacks[name]
            start = time.perf_counter()
            traces, iterations, spent, lagrange = [], [], [], []
            for s in range(0, len(workload), args.batch):
                sl = slice(s, s + args.batch)
                r = attack(model, gallery, images[sl], workload[sl], query_labels=labels[sl])
                traces.append(r.trace)
                iterations.append(r.metrics["iterations"])
                # SDHA's binary search of alpha runs several times: its cost and its choice per query.
                spent.append(r.metrics.get("search_iterations", r.metrics["iterations"]))
                if "lagrange" in r.metrics:
                    lagrange.append(r.metrics["lagrange"])
            trace = AttackTrace.cat(traces)
            seconds = time.perf_counter() - start
            entry[name] = {"targeted": attack.targeted, "hparams": attack.hparams, "seconds": seconds,
                           "tanh_scale_factor": factor,
                           "mean_iterations": float(torch.cat(iterations).mean()),
                           "mean_search_iterations": float(torch.cat(spent).mean()),
                           "lagrange": torch.cat(lagrange).tolist() if lagrange else None,
                           "iterations": trace.iterations.tolist(), "ap": trace.ap.tolist(), "l2": trace.l2.tolist()}
            final_map, final_l2 = trace.final()
            print(f"[{bits} bits] {name}: clean mAP {float(trace.ap[:, 0].mean()):.4f} -> {final_map:.4f}, "
                  f"l2 {final_l2:.3f}, {entry[name]['mean_iterations']:.0f} iterations/query "
                  f"({entry[name]['mean_search_iterations']:.0f} over all runs), {seconds:.0f} s",
                  flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results))
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", nargs="*", default=[], help="DCH checkpoints (one per code length)")
    parser.add_argument("--from-json", nargs="+", default=None,
                        help="only print the tables of results files (merged; e.g. one per code length)")
    parser.add_argument("--out", default="runs/sdha/tables.json")
    parser.add_argument("--attacks", nargs="*", choices=UNTARGETED + TARGETED, default=None)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eps", type=float, default=0.039)
    parser.add_argument("--topk", type=int, default=1000)
    parser.add_argument("--check-every", type=int, default=10)
    parser.add_argument("--steps", type=int, default=1500, help="SDHA / SDHA-UW iterations")
    parser.add_argument("--baseline-steps", type=int, default=2000, help="HAG / DHTA iterations")
    parser.add_argument("--lr", type=float, default=0.01, help="SDHA Adam learning rate")
    parser.add_argument("--lagrange", type=float, default=20.0, help="SDHA alpha * K")
    parser.add_argument("--lagrange-targeted", type=float, default=None, help="targeted alpha * K (default: --lagrange)")
    parser.add_argument("--search-steps", type=int, default=1,
                        help="SDHA: runs of the per-query binary search of alpha (1: alpha fixed at --lagrange / K)")
    parser.add_argument("--goal-ap-untargeted", type=float, default=None,
                        help="per-query AP at which the untargeted attacks stop (default: the paper's 0)")
    parser.add_argument("--goal-ap-targeted", type=float, default=None,
                        help="per-query AP at which the targeted attacks stop (default: the paper's 1)")
    parser.add_argument("--tanh-scale-factor", type=_scale_factor, default=1.0,
                        help="multiplies the paper's gamma schedule (0.1 ... 1.0) of every attack; 'auto': "
                             "1 / median |hash logit| of the model's clean workload (attacks.logit_scale_factor)")
    parser.add_argument("--hag-lr", type=float, default=500.0)
    parser.add_argument("--dhta-lr", type=float, default=1 / 255)
    parser.add_argument("--untargeted-map", type=float, default=0.1)
    parser.add_argument("--targeted-map", type=float, default=0.9)
    parser.add_argument("--budgets-untargeted", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--budgets-targeted", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_json:
        # Code lengths run as separate processes write separate files; later files win per attack.
        results = {}
        for path in args.from_json:
            for bits, entry in json.loads(Path(path).read_text()).items():
                results.setdefault(bits, {}).update(entry)
    elif args.ckpt:
        results = run(args)
    else:
        parser.error("give --ckpt checkpoints to attack, or --from-json results to print")
    if not math.isfinite(args.untargeted_map):
        parser.error("--untargeted-map must be finite")
    print_tables(results, args)


if __name__ == "__main__":
    main()
