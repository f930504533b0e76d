"""k-means PQ checkpoints of a trained ranker, so that ``eval.py`` attacks them with PQ-AG.

::

    python -m robust_ranking.cli.kmeans_pq --ckpt runs/fashion_mnist_ct/version_0/checkpoints/last.ckpt \\
        --bits 16 24 32 --out runs/fashion_mnist_ct_kmeans_pq
    robust-ranking-kmeans-pq ...      # the same program, installed as a console script

The ranker and its data come from the checkpoint's run (``<run>/config.yaml``), loaded safely
(:mod:`evaluation.checkpoints`). The data module is switched to the query / database protocol
(``--num_queries`` test images drawn with ``--seed`` are the queries; ``--database test_rest``: the
other test images, or ``train``); for each bit budget a :class:`lightning_modules.KMeansPQRanker`
(faiss k-means, M = ``--num_codebooks`` codebooks, ``--seed``) is fitted on the ranker's
embeddings of that database, and ``<out>/<bits>bit/config.yaml`` (the ``model`` section: the
KMeansPQRanker around the source run's model; the ``data`` section: the source run's data module
with the split) and ``<out>/<bits>bit/checkpoints/kmeans.ckpt`` (the state dict) are written.
``eval.py --ckpt <out>/<bits>bit/checkpoints/kmeans.ckpt`` rebuilds the model from that config.

Bad input ends with one line ``kmeans_pq: error: ...`` and exit status 2, before any fitting.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml

from robust_ranking.attacks.transfer import embed_all
from robust_ranking.data import DataConfigError, RetrievalDataModule
from robust_ranking.evaluation.checkpoints import instantiate, load_ranker, run_config
from robust_ranking.evaluation.errors import EvaluationError, one_line
from robust_ranking.lightning_modules import KMeansPQRanker

__all__ = ["main", "split_section"]

PROG = "kmeans_pq"


def _fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def split_section(data_section: dict[str, Any], num_queries: int, database: str, seed: int) -> dict[str, Any]:
    """The run's data section with the query / database protocol of the PQ tables."""
    init_args = {**(data_section.get("init_args") or {}), "protocol": "query_database", "num_queries": num_queries,
                 "database": database, "seed": seed}
    return {**data_section, "init_args": init_args}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint of a trained ranker (a train.py run)")
    parser.add_argument("--out", required=True, help="output folder (one sub-folder per bit budget)")
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 24, 32], help="code lengths (default 16 24 32)")
    parser.add_argument("--num_codebooks", "--num-codebooks", type=int, default=4, help="M (default 4)")
    parser.add_argument("--alpha", type=float, default=50.0, help="soft-assignment temperature (default 50)")
    parser.add_argument("--num_queries", type=int, default=1000, help="queries of the split (default 1000)")
    parser.add_argument("--database", choices=("test_rest", "train"), default="test_rest",
                        help="the database the codebooks are fitted on (default: the test images that are not queries)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the query draw and of k-means (default 0)")
    return parser


def main(argv: list[str] | None = None) -> list[Path]:
    """Fit and save one k-means PQ checkpoint per ``--bits``; returns their paths."""
    args = build_parser().parse_args(argv)
    ckpt = Path(args.ckpt)
    if not ckpt.is_file():
        _fail(f"checkpoint {ckpt} does not exist")
    for bits in args.bits:
        if bits < 1 or bits % args.num_codebooks:
            _fail(f"--bits {bits}: must be a positive multiple of --num_codebooks {args.num_codebooks}")
    try:
        model_section, data_section, where = run_config(ckpt, None)
        ranker = load_ranker(ckpt, model_section, where).eval()  # refuses an unsafe file before anything else
        if model_section is None or data_section is None:
            _fail(f"{where} has no 'model' and 'data' sections: a k-means PQ checkpoint needs the run's config.yaml")
        data = split_section(data_section, args.num_queries, args.database, args.seed)
        datamodule = instantiate(data, RetrievalDataModule, "data", where)
        datamodule.setup("test")
    except (EvaluationError, DataConfigError, FileNotFoundError, ValueError) as err:
        _fail(one_line(err))
    images = torch.cat([batch[0] for batch in datamodule.database_dataloader()])
    embeddings = embed_all(ranker, images, batch_size=1000)
    written = []
    for bits in args.bits:
        started = time.perf_counter()
        try:
            model = KMeansPQRanker.fit(ranker, embeddings, num_bits=bits, num_codebooks=args.num_codebooks,
                                       alpha=args.alpha, seed=args.seed)
        except ValueError as err:
            _fail(one_line(err))
        folder = Path(args.out) / f"{bits}bit"
        (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
        config = {"model": {"class_path": "robust_ranking.lightning_modules.KMeansPQRanker",
                            "init_args": {"ranker": model_section, "num_bits": bits,
                                          "num_codebooks": args.num_codebooks, "alpha": args.alpha,
                                          "feature_dim": int(embeddings.shape[1])}},
                  "data": data}
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        path = folder / "checkpoints" / "kmeans.ckpt"
        torch.save({"state_dict": model.state_dict(),
                    "hyper_parameters": {"source_checkpoint": str(ckpt), "num_bits": bits,
                                         "num_codebooks": args.num_codebooks, "alpha": args.alpha, "seed": args.seed}},
                   path)
        print(f"{path}: {bits} bits, M x K = {model.codebooks.shape[0]} x {model.codebooks.shape[1]}, "
              f"fitted on {embeddings.shape[0]} database embeddings in {time.perf_counter() - started:.1f} s")
        written.append(path)
    return written


if __name__ == "__main__":
    main()
