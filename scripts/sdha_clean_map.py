"""Clean Hamming retrieval metrics of DCH checkpoints under the query / database protocol (SDHA Table 1).

For each checkpoint: the 1,000 test queries of its run's data config against the database (the
60,000 training images), ranked by Hamming distance with ties broken by database index:
mAP@1000 (SDHA / HAG), mAP over the whole ranking, mAP and precision within Hamming radius 2
(DCH), and the precision-recall curve over Hamming radii. mAP@1000 is also re-computed from
the faiss :class:`retrieval.HammingIndex` top-1000 lists as a cross-check.

    .venv/bin/python scripts/sdha_clean_map.py runs/fashion_mnist_dch_*/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sdha_common import encode_set, load_run  # noqa: I001  (sets up sys.path)
from retrieval import evaluate_hashing
from retrieval.topk_metrics import average_precision_at_topk


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpts", nargs="+")
    parser.add_argument("--json", default=None, help="write the metrics (with PR curves) to this file")
    args = parser.parse_args(argv)
    rows = []
    for ckpt in args.ckpts:
        start = time.perf_counter()
        model, dm = load_run(ckpt)
        q_codes, q_labels = encode_set(model, dm.query_set)
        db_codes, db_labels = encode_set(model, dm.database_set)
        out = evaluate_hashing(q_codes, q_labels, db_codes, db_labels, topks=(1000, None), radius=2)
        _, ids = model.build_index(db_codes).search(q_codes, min(1000, len(db_labels)))
        out["map@1000_faiss"] = float(average_precision_at_topk(db_labels[ids] == q_labels[:, None]).mean())
        out.update(ckpt=ckpt, bits=model.hash_bits, queries=len(q_labels), database=len(db_labels),
                   seconds=time.perf_counter() - start)
        rows.append(out)
    print("| bits | mAP@1000 | mAP (all) | mAP@H<=2 | P@H<=2 | queries x database | checkpoint |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        assert abs(r["map@1000"] - r["map@1000_faiss"]) < 1e-6, "faiss and brute-force rankings disagree"
        print(f"| {r['bits']} | {r['map@1000']:.4f} | {r['map']:.4f} | {r['map@H<=2']:.4f} | "
              f"{r['precision@H<=2']:.4f} | {r['queries']} x {r['database']} | {r['ckpt']} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
