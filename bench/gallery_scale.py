"""Clean metrics and one ranking attack on synthetic galleries of 10^4 .. 10^6 embeddings: wall time
and peak memory per size (docs/scale.md).

Per gallery size N (cosine, L2-normalized ``--dim``-d embeddings in N / ``--per-class`` clusters), in a
fresh process each, so every peak is that phase's own:

- ``full``: Recall@1/2/4/8, mAP (whole ranking) and MAP@R of ``--queries`` held-out queries (same
  clusters) against the whole gallery (``retrieval.evaluate_retrieval``, the torch path in query chunks of
  at most ``MAX_BLOCK_ELEMENTS`` entries above ``FAISS_MIN_GALLERY``);
- ``topk``: mAP@100 of the same queries (``retrieval.evaluate_query_database`` with the ranker's
  faiss ``build_index``; ``search_backend`` picks faiss above ``FAISS_MIN_GALLERY``);
- ``attack``: CA+ (w = 1, ``--steps`` PGD steps) on ``--num-samples`` candidates, through the same
  attack class the engine calls, against the N-item gallery (its memory is ``[B, w, N]``: the attack
  batch times the gallery, never N x N).

Memory: ``ru_maxrss`` (peak resident set) of the process minus its resident set just before the phase
(after the embeddings exist) = what the phase allocated at its peak; printed beside the chunk bound
(the largest query x gallery block, float32) and what an N x N float32 matrix would take.

    OMP_NUM_THREADS=1 .venv/bin/python bench/gallery_scale.py --sizes 10000,100000 --threads 1
    OMP_NUM_THREADS=1 .venv/bin/python bench/gallery_scale.py --sizes 1000000 --queries 100 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

MiB = 1 << 20


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def synthetic_gallery(n: int, dim: int, per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` L2-normalized embeddings around ``n // per_class`` random unit centres, built in blocks."""
    g = torch.Generator().manual_seed(seed)
    classes = max(1, n // per_class)
    centres = F.normalize(torch.randn(classes, dim, generator=g), dim=1)
    labels = torch.arange(n) % classes
    emb = torch.empty(n, dim)
    for s in range(0, n, 1 << 16):
        block = labels[s : s + (1 << 16)]
        noise = 0.15 * torch.randn(len(block), dim, generator=g)
        emb[s : s + len(block)] = F.normalize(centres[block] + noise, dim=1)
    return emb, labels


class LinearRanker(torch.nn.Module):
    """A tiny differentiable ranker for the attack phase: 8x8 images -> linear -> L2-normalized ``dim``-d."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(64, dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(x.flatten(1)), dim=1)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 1.0 - a @ b.transpose(-1, -2)


def run_phase(args: argparse.Namespace) -> dict:
    from robust_ranking.retrieval import evaluate_query_database, evaluate_retrieval
    from robust_ranking.retrieval.index import (FAISS_MIN_GALLERY, MAX_BLOCK_ELEMENTS, FaissFlatIndex, query_chunk_rows,
                                                search_backend)

    torch.set_num_threads(args.threads)
    n = args.size
    q = min(args.queries, n)
    # q held-out queries from the same clusters (not gallery members), then the N-item gallery
    everything, all_labels = synthetic_gallery(n + q, args.dim, args.per_class)
    query_emb, query_labels = everything[n:].clone(), all_labels[n:].clone()
    emb, labels = everything[:n], all_labels[:n]

    def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 1.0 - a @ b.transpose(-1, -2)

    def build_index(codes: torch.Tensor, use_gpu: bool | None = None) -> FaissFlatIndex:
        index = FaissFlatIndex("ip", use_gpu=use_gpu)
        index.add(codes)
        return index

    out: dict = {"size": n, "phase": args.phase, "dim": args.dim, "queries": q, "threads": torch.get_num_threads()}
    base = rss_bytes()
    start = time.perf_counter()
    if args.phase == "full":
        values = evaluate_retrieval(query_emb, query_labels, emb, labels, cos, nmi=False, index_factory=build_index)
        out["backend"] = search_backend(n, n, "cpu")  # the whole ranking: torch (k > GPU_MAX_K)
        out["chunk_rows"] = query_chunk_rows(n, 1024) if n > FAISS_MIN_GALLERY else min(1024, q)
        out["metrics"] = {k: round(v, 4) for k, v in values.items()}
    elif args.phase == "topk":
        values = evaluate_query_database(query_emb, query_labels, emb, labels, cos, topks=(100,),
                                         index_factory=build_index)
        out["backend"] = search_backend(n, 100, "cpu")
        out["chunk_rows"] = query_chunk_rows(n, 256)
        out["metrics"] = {k: round(v, 4) for k, v in values.items()}
    else:
        from robust_ranking.attacks import CandidateAttack, Gallery

        model = LinearRanker(args.dim).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(1)
        t = min(args.num_samples, n)
        idx = torch.linspace(0, n - 1, t).long()
        images = torch.rand(t, 1, 8, 8, generator=g)
        with torch.no_grad():
            emb[idx] = model.embed(images)  # the attacked candidates are gallery members
        base = rss_bytes()
        start = time.perf_counter()
        result = CandidateAttack("+", 1, eps=0.1, steps=args.steps)(model, Gallery(emb, labels), images, idx)
        out["backend"] = "torch ([B, w, N] distances)"
        out["chunk_rows"] = t  # the attack batch
        out["metrics"] = {"rank": round(float(result.metrics["rank"].mean()), 3),
                          "rank_clean": round(float(result.metrics["rank_clean"].mean()), 3)}
    out["wall_s"] = round(time.perf_counter() - start, 3)
    out["peak_rss_mib"] = round(peak_rss_bytes() / MiB, 1)
    out["phase_mib"] = round(max(0, peak_rss_bytes() - base) / MiB, 1)
    out["embeddings_mib"] = round(emb.numel() * 4 / MiB, 1)
    block_rows = out["chunk_rows"]
    out["chunk_bound_mib"] = round(block_rows * n * 4 / MiB, 1)  # one float32 query x gallery block
    out["nxn_mib"] = round(n * n * 4 / MiB, 1)
    out["max_block_elements"] = MAX_BLOCK_ELEMENTS
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gallery_scale.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated gallery sizes")
    parser.add_argument("--phases", default="full,topk,attack")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=50, help="gallery items per class")
    parser.add_argument("--queries", type=int, default=1000, help="queries of the clean-metric phases")
    parser.add_argument("--num-samples", type=int, default=16, help="CA+ candidates (one attack batch)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size is not None:
        print(json.dumps(run_phase(args)))
        return

    rows = []
    print(f"{'N':>9} {'phase':<7}{'backend':<30}{'wall s':>8}{'phase MiB':>10}{'chunk MiB':>10}{'N x N MiB':>11}"
          f"{'peak RSS':>9}  metrics")
    for size in [int(s) for s in args.sizes.split(",") if s]:
        for phase in [p for p in args.phases.split(",") if p]:
            cmd = [sys.executable, __file__, "--size", str(size), "--phase", phase, "--dim", str(args.dim),
                   "--per-class", str(args.per_class), "--queries", str(args.queries),
                   "--num-samples", str(args.num_samples), "--steps", str(args.steps), "--threads", str(args.threads)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"gallery_scale.py: N = {size} {phase} failed")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{size:>9} {phase:<7}{row['backend']:<30}{row['wall_s']:>8.2f}{row['phase_mib']:>10.1f}"
                  f"{row['chunk_bound_mib']:>10.1f}{row['nxn_mib']:>11.0f}{row['peak_rss_mib']:>9.0f}  {row['metrics']}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
