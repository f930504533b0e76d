"""Save k-means PQ checkpoints of a trained ranker, so eval.py can attack them with PQ-AG.

    python scripts/pq_kmeans_checkpoint.py --ckpt runs/fashion_mnist_ct/version_0/checkpoints/last.ckpt \
        --bits 16 24 32 --out runs/fashion_mnist_ct_kmeans_pq

For each bit budget: fits :class:`lightning_modules.KMeansPQRanker` (faiss k-means, seed 0, M = 4
codebooks) on the ranker's embeddings of the database of docs/dpqn.md (the 9000 Fashion-MNIST
test images that are not among the 1000 queries) and writes ``<out>/<bits>bit/config.yaml`` (the
``model`` section: the KMeansPQRanker around the source run's model section; the ``data``
section: the source run's data module with ``protocol: query_database``) and
``<out>/<bits>bit/checkpoints/kmeans.ckpt`` (the state dict: ranker weights, centroids, the
``fitted`` flag). ``eval.py --ckpt <out>/<bits>bit/checkpoints/kmeans.ckpt`` rebuilds the model
from the config and loads the state dict.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml
from pq_common import batched, load_ranker, query_database, run_config

from robust_ranking.lightning_modules import KMeansPQRanker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint of a trained ranker (train.py run)")
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 24, 32])
    parser.add_argument("--num-codebooks", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=50.0)
    parser.add_argument("--out", required=True, help="output folder (one sub-folder per bit budget)")
    args = parser.parse_args()

    source = run_config(args.ckpt)
    ranker = load_ranker(args.ckpt)
    _, database = query_database()
    embeddings = batched(ranker.embed, database.images)
    data = dict(source["data"])
    data["init_args"] = {**data.get("init_args", {}), "protocol": "query_database", "num_queries": 1000,
                         "database": "test_rest", "seed": 0}
    for bits in args.bits:
        started = time.perf_counter()
        model = KMeansPQRanker.fit(ranker, embeddings, num_bits=bits, num_codebooks=args.num_codebooks,
                                   alpha=args.alpha, seed=0)
        folder = Path(args.out) / f"{bits}bit"
        (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
        config = {"model": {"class_path": "robust_ranking.lightning_modules.KMeansPQRanker",
                            "init_args": {"ranker": source["model"], "num_bits": bits,
                                          "num_codebooks": args.num_codebooks, "alpha": args.alpha,
                                          "feature_dim": int(embeddings.shape[1])}},
                  "data": data}
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        torch.save({"state_dict": model.state_dict(),
                    "hyper_parameters": {"source_checkpoint": str(args.ckpt), "num_bits": bits,
                                         "num_codebooks": args.num_codebooks, "alpha": args.alpha, "seed": 0}},
                   folder / "checkpoints" / "kmeans.ckpt")
        print(f"{folder / 'checkpoints' / 'kmeans.ckpt'}: {bits} bits, M x K = {model.codebooks.shape[0]} x "
              f"{model.codebooks.shape[1]}, fitted in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
