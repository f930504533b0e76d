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
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from pq_common import build_model, parse_models, query_database

from attacks import Gallery, PQAGAttack, query_average_precision
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="LABEL=pq:<ckpt> | LABEL=kmeans:<ckpt>:<bits>[:<M>]")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--step-size", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--topk", type=int, default=None, help="AP@topk instead of the whole ranking")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--transfer", action="store_true", help="also the AOD transfer matrix between the models")
    parser.add_argument("--pr-cutoffs", type=int, nargs="*", default=[],
                        help="also precision / recall at these ranking cut-offs (clean and attacked, to --json)")
    parser.add_argument("--json", help="write all numbers here")
    args = parser.parse_args()
    if args.transfer and "aod" not in args.variants:
        parser.error("--transfer crafts AOD queries: keep aod in --variants")
    torch.manual_seed(0)

    queries, database = query_database()
    q_idx = torch.arange(len(queries.labels))
    batches = [slice(s, s + args.batch_size) for s in range(0, len(q_idx), args.batch_size)]
    models, galleries, adversarial, table, walls = {}, {}, {}, {}, {}
    for label, spec in parse_models(args.model):
        model = build_model(spec, database)
        with torch.no_grad():
            codes = torch.cat([model.encode(database.images[s : s + 1000]) for s in range(0, len(database.labels), 1000)])
        models[label], galleries[label] = model, Gallery(codes, database.labels)
        table[label], walls[label] = {}, {}
        for variant in args.variants:
            attack = PQAGAttack(variant, eps=args.eps, alpha=args.step_size, steps=args.steps, topk=args.topk)
            started = time.perf_counter()
            results = [attack(model, galleries[label], queries.images[b], q_idx[b], query_labels=queries.labels[b])
                       for b in batches]
            walls[label][variant] = time.perf_counter() - started
            for mode in ("sdc", "adc"):
                table[label].setdefault("clean", {})[mode] = mean([r.metrics[f"ap_{mode}_clean"] for r in results])
                table[label].setdefault(variant, {})[mode] = mean([r.metrics[f"ap_{mode}"] for r in results])
            table[label][variant]["code_change"] = mean([r.metrics["code_change"] for r in results])
            if variant == "aod":
                adversarial[label] = torch.cat([r.adversarial for r in results])
            if args.pr_cutoffs:
                for key, images in (("clean", queries.images), (variant, torch.cat([r.adversarial for r in results]))):
                    table[label].setdefault("pr", {})[key] = pr_curves(model, galleries[label], images, queries.labels,
                                                                        args.pr_cutoffs)
        print(f"# {label}: {spec} ({model.num_bits} bits, M x K = {model.codebooks.shape[0]} x "
              f"{model.codebooks.shape[1]}); attack wall s: "
              + ", ".join(f"{v} {w:.0f}" for v, w in walls[label].items()), flush=True)

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

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "table": table, "transfer": transfer, "attack_wall_s": walls}, f, indent=1)


if __name__ == "__main__":
    main()
