"""Clean PQ retrieval metrics (SDC / ADC mAP, mAP@topk, precision-recall) on Fashion-MNIST.

    python scripts/pq_eval.py --model 24bit=pq:runs/fashion_mnist_dpqn_24bit/version_0/checkpoints/last.ckpt \
        --model ct-24=kmeans:runs/fashion_mnist_ct/version_0/checkpoints/last.ckpt:24

Query / database protocol of docs/dpqn.md (1000 test queries, seed 0; database = the other 9000
test images). SDC ranks database codes by the quantized query, ADC by the unquantized query
feature; rankings are stable (ties by database index); mAP is over the whole ranking and over the
first ``--topk`` results (:func:`retrieval.topk_metrics.evaluate_query_database`). Prints a
Markdown table; ``--json`` also writes every number, the PR curves included.
"""

from __future__ import annotations

import argparse
import json
import time

from pq_common import batched, build_model, parse_models, query_database

from retrieval.topk_metrics import evaluate_query_database


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="LABEL=pq:<ckpt> | LABEL=kmeans:<ckpt>:<bits>[:<M>]")
    parser.add_argument("--topk", type=int, default=1000)
    parser.add_argument("--pr-cutoffs", type=int, nargs="*", default=[1, 10, 50, 100, 500, 1000, 2000, 4000, 6000, 9000])
    parser.add_argument("--json", help="write all metrics here")
    args = parser.parse_args()

    queries, database = query_database()
    rows, results = [], {}
    for label, spec in parse_models(args.model):
        started = time.perf_counter()
        model = build_model(spec, database)
        q_codes, q_feats = batched(model.encode, queries.images), batched(model.embed, queries.images)
        db_codes = batched(model.encode, database.images)
        common = dict(topks=(None, args.topk), pr_cutoffs=args.pr_cutoffs)
        sdc = evaluate_query_database(q_codes, queries.labels, db_codes, database.labels, model.sdc_distance, **common)
        adc = evaluate_query_database(q_feats, queries.labels, db_codes, database.labels, model.adc_distance, **common)
        # The unquantized features ranked by the model's own distance: what PQ costs.
        flat = evaluate_query_database(q_feats, queries.labels, batched(model.embed, database.images),
                                       database.labels, model.distance, topks=(None,))
        wall = time.perf_counter() - started
        m, k, _ = model.codebooks.shape
        results[label] = {"spec": spec, "bits": model.num_bits, "M": m, "K": k, "sdc": sdc, "adc": adc,
                          "float": flat, "wall_s": wall}
        rows.append(f"| {label} | {model.num_bits} | {m} x {k} | {100 * sdc['map']:.1f} | {100 * adc['map']:.1f} | "
                    f"{100 * sdc[f'map@{args.topk}']:.1f} | {100 * adc[f'map@{args.topk}']:.1f} | "
                    f"{100 * flat['map']:.1f} | {wall:.0f} |")
    print(f"| model | bits | M x K | SDC mAP | ADC mAP | SDC mAP@{args.topk} | ADC mAP@{args.topk} | "
          "float mAP | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
