"""PQ-AG white-box table (Feng et al., AAAI 2020, Table 1 layout) and transfer matrices.

    python scripts/pq_ag_table.py \
        --model 16bit=pq:runs/fashion_mnist_dpqn_16bit/version_0/checkpoints/last.ckpt \
        --model 24bit=pq:runs/fashion_mnist_dpqn_24bit/version_0/checkpoints/last.ckpt \
        --transfer

Every model is attacked on the whole query set (docs/dpqn.md: 1000 Fashion-MNIST test queries,
seed 0, against the other 9000 test images), in batches of ``--batch-size`` queries -- one PGD
per batch, no per-sample loop -- with Basic, APD and AOD at the paper's settings (eps 8/255,
step 0.01, 5 iterations, random start). The table reports mAP x 100 under SDC and ADC.

``--transfer`` adds the black-box matrix of the paper's Tables 3 / 4: AOD queries crafted on the
row model, measured on the column model (SDC / ADC mAP). Same family at different bit budgets =
bits transferability; different backbones or training = model transferability.
``--adversarial-cache DIR`` keeps every model's adversarial queries (keyed by spec and attack
settings), so a model can join a transfer matrix later without crafting the others' again.

Besides the mAPs, per model and variant (printed, and in ``--json``): ``code_change`` (fraction of
the M query sub-codes the attack changed), ``feature_shift`` (mean ``||F(y^) - F(y)||^2``), and
for the clean queries the mean peak probability and entropy of the soft assignment (AOD's target).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from pq_common import Split, build_model, parse_models, query_database

from attacks import AttackResult, Gallery, PQAGAttack, query_average_precision
from lightning_modules import UnsafeCheckpointError, load_checkpoint
from retrieval.topk_metrics import precision_recall_at_cutoffs

VARIANTS = ("basic", "apd", "aod")
ROW_NAMES = {"clean": "Clean", "basic": "Basic", "apd": "APD", "aod": "AOD"}


def mean(values: list[torch.Tensor]) -> float:
    return float(torch.cat(values).double().mean())


@torch.no_grad()
def pr_curves(model, gallery: Gallery, images: torch.Tensor, labels: torch.Tensor, cutoffs: list[int]) -> dict:
    """Mean precision / recall at ``cutoffs`` under SDC and ADC (the paper's Fig. 5)."""
    out = {}
    for mode in ("sdc", "adc"):
        query = model.encode(images) if mode == "sdc" else model.embed(images)
        distance = model.sdc_distance if mode == "sdc" else model.adc_distance
        precision, recall = precision_recall_at_cutoffs(distance(query, gallery.embeddings), labels, gallery.labels,
                                                        cutoffs)
        out[mode] = {"cutoffs": list(cutoffs), "precision": precision.tolist(), "recall": recall.tolist()}
    return out


def spec_files(spec: str) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of the checkpoint(s) a spec names: a retrained checkpoint at the same
    path must not reuse adversarial queries crafted on the old one."""
    return [(part, (st := Path(part).stat()).st_size, st.st_mtime_ns) for part in spec.split(":")
            if Path(part).is_file()]


def load_cache(cache: Path) -> dict:
    """A stored ``{"key": ..., "adversarial": tensor}`` cache, read with ``weights_only`` (nothing in
    the file can run code); a refused or unreadable file ends the script with one line."""
    try:
        return load_checkpoint(cache)
    except UnsafeCheckpointError as err:
        raise SystemExit(f"error: adversarial cache {err}; delete it to recompute") from None


@torch.no_grad()
def replay(model, gallery: Gallery, adversarial: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
           topk: int | None) -> AttackResult:
    """The metrics :class:`attacks.PQAGAttack` reports, for stored adversarial queries."""
    adv = query_average_precision(model, gallery, adversarial, labels, topk)
    clean = query_average_precision(model, gallery, images, labels, topk)
    metrics = {**adv, **{f"{k}_clean": v for k, v in clean.items()},
               "code_change": (model.encode(adversarial) != model.encode(images)).float().mean(-1)}
    return AttackResult(adversarial=adversarial, perturbation=adversarial - images, metrics=metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="LABEL=pq:<ckpt> | LABEL=kmeans:<ckpt>:<bits>[:<M>]")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--step-size", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--topk", type=int, default=None, help="AP@topk instead of the whole ranking")
    parser.add_argument("--temperature", type=float, default=None,
                        help="soft-assignment temperature of APD / AOD (default: each model's own alpha)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--transfer", action="store_true", help="also the AOD transfer matrix between the models")
    parser.add_argument("--pr-cutoffs", type=int, nargs="*", default=[],
                        help="also precision / recall at these ranking cut-offs (clean and attacked, to --json)")
    parser.add_argument("--num-queries", type=int, default=1000,
                        help="size of the query set (docs/dpqn.md: 1000; fewer only for smoke runs)")
    parser.add_argument("--query-subset", type=int, default=None, metavar="N",
                        help="attack only the first N queries of the split (the database is unchanged): for "
                             "backbones too slow to attack all of them on CPU")
    parser.add_argument("--adversarial-cache", metavar="DIR",
                        help="store each model's adversarial queries here (<label>-<variant>.pt) and reuse them on a "
                             "later run with the same spec and attack settings, e.g. to add a model to a transfer "
                             "matrix without crafting the others' queries again")
    parser.add_argument("--json", help="write all numbers here")
    args = parser.parse_args()
    if args.transfer and "aod" not in args.variants:
        parser.error("--transfer crafts AOD queries: keep aod in --variants")
    torch.manual_seed(0)
    started_all = time.perf_counter()

    queries, database = query_database(num_queries=args.num_queries)
    if args.query_subset is not None:
        queries = Split(queries.images[: args.query_subset], queries.labels[: args.query_subset])
    q_idx = torch.arange(len(queries.labels))
    batches = [slice(s, s + args.batch_size) for s in range(0, len(q_idx), args.batch_size)]
    models, galleries, adversarial, table, walls = {}, {}, {}, {}, {}
    for label, spec in parse_models(args.model):
        model, embeddings = build_model(spec, database, return_embeddings=True)
        with torch.no_grad():
            if embeddings is not None and hasattr(model, "quantizer"):  # = model.encode(database), one pass fewer
                codes = model.quantizer.hard_codes(embeddings)
            else:
                codes = torch.cat([model.encode(database.images[s : s + 1000])
                                   for s in range(0, len(database.labels), 1000)])
        models[label], galleries[label] = model, Gallery(codes, database.labels)
        table[label], walls[label] = {}, {}
        for variant in args.variants:
            attack = PQAGAttack(variant, eps=args.eps, alpha=args.step_size, steps=args.steps, topk=args.topk,
                                temperature=args.temperature)
            started = time.perf_counter()
            cache = None if args.adversarial_cache is None else Path(args.adversarial_cache) / (
                re.sub(r"[^A-Za-z0-9_.-]", "_", label) + f"-{variant}.pt")
            cache_key = {"spec": spec, "num_queries": args.num_queries, **attack.hparams, "eps": attack.eps,
                         **({} if args.query_subset is None else {"query_subset": args.query_subset}),
                         "files": spec_files(spec)}
            stored = load_cache(cache) if cache is not None and cache.is_file() else None
            if stored is not None and stored["key"] == cache_key:
                results = [replay(model, galleries[label], stored["adversarial"][b], queries.images[b],
                                  queries.labels[b], args.topk) for b in batches]
                print(f"# {label} {variant}: adversarial queries from {cache}", flush=True)
            else:
                results = [attack(model, galleries[label], queries.images[b], q_idx[b],
                                  query_labels=queries.labels[b]) for b in batches]
                if cache is not None:
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    torch.save({"key": cache_key, "adversarial": torch.cat([r.adversarial for r in results])}, cache)
            walls[label][variant] = time.perf_counter() - started
            for mode in ("sdc", "adc"):
                table[label].setdefault("clean", {})[mode] = mean([r.metrics[f"ap_{mode}_clean"] for r in results])
                table[label].setdefault(variant, {})[mode] = mean([r.metrics[f"ap_{mode}"] for r in results])
            table[label][variant]["code_change"] = mean([r.metrics["code_change"] for r in results])
            # How far each attack moved the query feature (squared L2 of the unit-per-sub-space
            # feature for DPQN): separates "moved little" from "moved but kept the codes".
            with torch.no_grad():
                shift = [(model.embed(r.adversarial) - model.embed(queries.images[b])).pow(2).sum(-1)
                         for r, b in zip(results, batches)]
            table[label][variant]["feature_shift"] = mean(shift)
            if variant == "aod":
                adversarial[label] = torch.cat([r.adversarial for r in results])
            if args.pr_cutoffs:
                for key, images in (("clean", queries.images), (variant, torch.cat([r.adversarial for r in results]))):
                    table[label].setdefault("pr", {})[key] = pr_curves(model, galleries[label], images, queries.labels,
                                                                        args.pr_cutoffs)
        with torch.no_grad():  # how peaked the clean soft assignment is (what AOD's target looks like)
            p = torch.cat([model.soft_assignment(model.embed(queries.images[b]), args.temperature) for b in batches])
        table[label]["clean"]["peak_probability"] = float(p.max(-1).values.double().mean())
        table[label]["clean"]["entropy"] = float(-(p * p.clamp_min(1e-30).log()).sum(-1).double().mean())
        print(f"# {label}: {spec} ({model.num_bits} bits, M x K = {model.codebooks.shape[0]} x "
              f"{model.codebooks.shape[1]}); attack wall s: "
              + ", ".join(f"{v} {w:.0f}" for v, w in walls[label].items())
              + "; code change / feature shift: "
              + ", ".join(f"{v} {table[label][v]['code_change']:.3f} / {table[label][v]['feature_shift']:.3f}"
                          for v in args.variants)
              + f"; clean peak p {table[label]['clean']['peak_probability']:.3f}", flush=True)

    labels = list(models)
    print(f"\n| | | {' | '.join(labels)} |")
    print(f"| --- | --- |{' --- |' * len(labels)}")
    for mode in ("sdc", "adc"):
        for row in ("clean", *args.variants):
            cells = " | ".join(f"{100 * table[lb][row][mode]:.1f}" for lb in labels)
            print(f"| {mode.upper() if row == 'clean' else ''} | {ROW_NAMES[row]} | {cells} |")

    transfer: dict[str, dict[str, dict[str, float]]] = {}
    if args.transfer:
        for source in labels:
            transfer[source] = {}
            for target in labels:
                aps = [query_average_precision(models[target], galleries[target], adversarial[source][b],
                                               queries.labels[b], args.topk) for b in batches]
                transfer[source][target] = {m: mean([a[f"ap_{m}"] for a in aps]) for m in ("sdc", "adc")}
        print(f"\nAOD transfer (rows: crafted on; columns: attacked; SDC / ADC mAP x 100)\n\n| | {' | '.join(labels)} |")
        print(f"| --- |{' --- |' * len(labels)}")
        print("| Clean | " + " | ".join(f"{100 * table[t]['clean']['sdc']:.1f} / {100 * table[t]['clean']['adc']:.1f}"
                                      for t in labels) + " |")
        for source in labels:
            print(f"| {source} | " + " | ".join(
                f"{100 * transfer[source][t]['sdc']:.1f} / {100 * transfer[source][t]['adc']:.1f}" for t in labels) + " |")

    total = time.perf_counter() - started_all
    print(f"\ntotal wall: {total:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "table": table, "transfer": transfer, "attack_wall_s": walls,
                       "total_wall_s": total}, f, indent=1)


if __name__ == "__main__":
    main()
