"""Cost of SDHA (Lu et al., ICMR 2021) per query relative to plain forward + backward passes.

SDHA runs, per iteration and per active query, one forward of the hashing network, the
surrogate objective against the whole database (two ``[B, N] x K`` matrix products: the AP
weights and the weighted code sum), one backward to the input and an Adam step; every
``check_every`` iterations an AP@1000 check (a top-k over the ``[B, N]`` Hamming distances).
This script times

- ``attack``: :class:`attacks.SDHAAttack` on ``--batch`` queries for ``--steps`` iterations,
  early termination off (so every query runs every iteration; with it on the cost only drops);
- ``plain``: the same number of forward + backward passes of the same batch with the input
  gradient of ``hash_logits(x).sum()`` (what any gradient attack pays at least);

and reports ``attack / plain`` (the overhead factor; 1 = free objective and bookkeeping) and the
seconds per query for the full 1500 iterations. The database is ``--database`` random codes
(default 60,000, the Fashion-MNIST training split) with 10 random labels; weights are random
unless ``--ckpt`` gives a DCHRanker checkpoint (the cost does not depend on them when early
termination is off). Interleaved repeats, the fastest of each kept.

Run used in docs/dch.md::

    nice -n 10 .venv/bin/python bench/sdha_cost.py --bits 64 --batch 100 --steps 100 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from robust_ranking.attacks import Gallery, SDHAAttack
from robust_ranking.lightning_modules import C2F1, DCHLoss, DCHRanker, UnsafeCheckpointError, load_checkpoint
from robust_ranking.retrieval import sign_codes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--batch", type=int, default=100, help="queries attacked together (the paper: 100)")
    parser.add_argument("--steps", type=int, default=100, help="timed iterations (extrapolated to --full-steps)")
    parser.add_argument("--full-steps", type=int, default=1500, help="SDHA's iteration budget")
    parser.add_argument("--database", type=int, default=60000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ckpt", default=None, help="optional DCHRanker checkpoint (else random weights)")
    return parser.parse_args(argv)


def make_model(args: argparse.Namespace) -> DCHRanker:
    if args.ckpt:
        try:  # weights_only: nothing in the file can run code
            state = load_checkpoint(args.ckpt)["state_dict"]
        except (UnsafeCheckpointError, FileNotFoundError) as err:
            raise SystemExit(f"error: {err}") from None
        except KeyError:
            raise SystemExit(f"error: {args.ckpt} holds no state_dict") from None
        bits = state["hash_layer.weight"].shape[0]
        model = DCHRanker(C2F1(embedding_dim=state["hash_layer.weight"].shape[1]), DCHLoss(), hash_bits=bits)
        model.load_state_dict(state)
        return model
    torch.manual_seed(0)
    return DCHRanker(C2F1(embedding_dim=1024), DCHLoss(), hash_bits=args.bits)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_plain(model: DCHRanker, images: torch.Tensor, steps: int) -> float:
    sync(images.device)
    start = time.perf_counter()
    for _ in range(steps):
        x = images.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model.hash_logits(x).sum(), x)
    sync(images.device)
    return time.perf_counter() - start


def time_attack(attack: SDHAAttack, model: DCHRanker, gallery: Gallery, images: torch.Tensor,
                labels: torch.Tensor) -> float:
    sync(images.device)
    start = time.perf_counter()
    attack(model, gallery, images, torch.arange(len(images)), query_labels=labels)
    sync(images.device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = make_model(args).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 1, 28, 28, generator=g).to(device)
    labels = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    codes = sign_codes(torch.randn(args.database, model.hash_bits, generator=g)).to(device)
    gallery = Gallery(codes, torch.randint(0, 10, (args.database,), generator=g).to(device))
    attack = SDHAAttack(steps=args.steps, early_stop=False)

    time_plain(model, images, 2)  # warm-up
    plain, full = [], []
    for _ in range(args.repeats):
        plain.append(time_plain(model, images, args.steps))
        full.append(time_attack(attack, model, gallery, images, labels))
    t_plain, t_attack = min(plain), min(full)
    per_query = t_attack / args.steps * args.full_steps / args.batch
    result = {"ratio": t_attack / t_plain, "attack_s": t_attack, "plain_s": t_plain,
              "seconds_per_query_full": per_query}
    print(f"device {device}, threads {torch.get_num_threads()}, {args.bits} bits, batch {args.batch}, "
          f"database {args.database}, {args.steps} iterations (fastest of {args.repeats})")
    print(f"  plain forward+backward: {t_plain:.3f} s   SDHA: {t_attack:.3f} s   ratio {t_attack / t_plain:.2f}")
    print(f"  SDHA per query, {args.full_steps} iterations: {per_query:.3f} s "
          f"({t_plain / args.steps * args.full_steps / args.batch:.3f} s of plain passes)")
    return result


if __name__ == "__main__":
    main()
