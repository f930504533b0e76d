"""Why AOD can trail APD: the input gradients of the PQ-AG losses at the clean query and at PGD's
random start (a diagnostic for the analysis in notes / docs/results/pq_ag.md).

    python scripts/pq_ag_gradients.py --model 24bit=pq:runs/fashion_mnist_dpqn_24bit/version_0/checkpoints/last.ckpt

For each model and variant, over the first ``--num-queries`` queries of docs/dpqn.md's split:
the mean L1 norm of ``d loss / d y`` at the clean query ``y`` and at the random start
``y + delta0`` (AOD's start in :class:`attacks.PQAGAttack`, shared by all three), and the mean
cosine between the APD and AOD gradients there; then where APD and AOD at the paper's settings
send the changed sub-codes (:func:`flip_statistics`). Basic (``-||F(y^) - F(y)||^2``) and AOD
(``sum p log p^`` = ``-KL(p || p^) - H(p)``) are both at a stationary point at ``y^ = y``
(the gradient of the KL w.r.t. the logits is ``p^ - p = 0``), APD (one-hot cross-entropy) is
not: its gradient at ``y`` already points at lowering the stored codeword's probability.
"""

from __future__ import annotations

import argparse
import json

import torch
from pq_common import build_model, parse_models, query_database

from attacks import PQAGAttack
from attacks.selection import keyed_uniform

VARIANTS = ("basic", "apd", "aod")


def input_gradient(loss_fn, images: torch.Tensor) -> torch.Tensor:
    """``d sum(loss) / d images`` (per-query losses are independent, so this is per query)."""
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(x).sum(), x)
    return grad.flatten(1)


def flip_statistics(model, images: torch.Tensor, idx: torch.Tensor) -> dict[str, dict[str, float]]:
    """Where APD and AOD (paper settings) send the query's sub-codes: the fraction changed, the
    fraction of changed ones that land on the clean soft assignment's runner-up codeword, and the
    mean rank (1 = clean peak) of the new codeword under the clean distribution."""
    with torch.no_grad():
        p = model.soft_assignment(model.embed(images))  # [B, M, K]
        rank_of = torch.empty_like(p, dtype=torch.long).scatter_(  # rank_of[b, m, k]: 1 = peak
            -1, p.argsort(-1, descending=True), torch.arange(1, p.shape[-1] + 1).expand_as(p).contiguous())
        clean_codes = model.encode(images)
    stats = {}
    for variant in ("apd", "aod"):
        attack = PQAGAttack(variant)
        adversarial = attack.pgd(attack._loss(model, images), images, idx)  # the attack's own PGD
        with torch.no_grad():
            codes = model.encode(adversarial)
        changed = codes != clean_codes
        new_rank = rank_of.gather(-1, codes.unsqueeze(-1)).squeeze(-1)[changed]
        stats[variant] = {"changed": float(changed.double().mean()),
                          "to_runner_up": float((new_rank == 2).double().mean()) if new_rank.numel() else 0.0,
                          "mean_rank": float(new_rank.double().mean()) if new_rank.numel() else 0.0}
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="LABEL=pq:<ckpt> | LABEL=kmeans:<ckpt>:<bits>")
    parser.add_argument("--num-queries", type=int, default=250, help="the first N queries of the split")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    torch.manual_seed(0)
    queries, database = query_database()
    images, idx = queries.images[: args.num_queries], torch.arange(args.num_queries)
    out = {}
    print("| model | variant | mean L1 grad at y | mean L1 grad at random start |")
    print("| --- | --- | --- | --- |")
    for label, spec in parse_models(args.model):
        model = build_model(spec, database)
        out[label], at_start = {}, {}
        # One common random start (AOD's), so that the gradients' directions are comparable.
        aod = PQAGAttack("aod")
        u = keyed_uniform(aod.seed, idx, tuple(images.shape[1:]), stream=f"{aod.name}/start", dtype=images.dtype)
        start = (images + (2.0 * u - 1.0) * aod.eps).clamp(0.0, 1.0)
        for variant in VARIANTS:
            attack = PQAGAttack(variant)  # the paper's defaults, as in the tables
            loss_fn = attack._loss(model, images)  # the exact loss the attack minimizes
            g_clean, g_start = input_gradient(loss_fn, images), input_gradient(loss_fn, start)
            at_start[variant] = g_start
            out[label][variant] = {"l1_at_clean": float(g_clean.abs().sum(1).mean()),
                                   "l1_at_start": float(g_start.abs().sum(1).mean())}
            print(f"| {label} | {variant} | {out[label][variant]['l1_at_clean']:.3g} | "
                  f"{out[label][variant]['l1_at_start']:.3g} |", flush=True)
        cos = torch.nn.functional.cosine_similarity(at_start["apd"], at_start["aod"], dim=1)
        out[label]["cos_apd_aod_at_start"] = float(cos.mean())
        print(f"| {label} | cos(APD, AOD) at start | {float(cos.mean()):.3f} | |", flush=True)
        out[label]["flips"] = flip_statistics(model, images, idx)
    print("\n| model | variant | sub-codes changed | of those, to the clean runner-up | mean clean rank of the new code |")
    print("| --- | --- | --- | --- | --- |")
    for label, stats in out.items():
        for variant, f in stats["flips"].items():
            print(f"| {label} | {variant} | {f['changed']:.3f} | {f['to_runner_up']:.3f} | {f['mean_rank']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
