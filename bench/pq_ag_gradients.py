"""Measurement study (not a robustness evaluation): why AOD can trail APD -- the input gradients of the
PQ-AG losses at the clean query and at PGD's random start, and where APD and AOD send the changed
sub-codes. It reports no attack's success on a model; it looks inside the attacks' losses, so it lives
in bench/ beside the cost studies (docs/results/pq_ag.md, "Does the paper's ordering hold?").

    python bench/pq_ag_gradients.py 24bit=runs/fashion_mnist_dpqn_24bit/version_0/checkpoints/last.ckpt

Each model is a PQ ranker checkpoint with its run's ``config.yaml`` (a DPQN of ``train.py``, or a k-means
PQ checkpoint of ``python -m robust_ranking.cli.kmeans_pq``); its data config gives the query / database split
(docs/dpqn.md: 1000 Fashion-MNIST test queries, seed 0). For each model and variant, over the first
``--num-queries`` queries: the mean L1 norm of ``d loss / d y`` at the clean query ``y`` and at the random
start ``y + delta0`` (AOD's start in :class:`attacks.PQAGAttack`, shared by all three), and the mean
cosine between the APD and AOD gradients there; then where APD and AOD at the paper's settings send the
changed sub-codes (:func:`flip_statistics`). Basic (``-||F(y^) - F(y)||^2``) and AOD (``sum p log p^`` =
``-KL(p || p^) - H(p)``) are both at a stationary point at ``y^ = y`` (the gradient of the KL w.r.t.
the logits is ``p^ - p = 0``), APD (one-hot cross-entropy) is not: its gradient at ``y`` already points
at lowering the stored codeword's probability.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from robust_ranking.attacks import PQAGAttack
from robust_ranking.attacks.quantization.pq_transfer import dataset_tensors
from robust_ranking.attacks.selection import keyed_uniform
from robust_ranking.data import RetrievalDataModule
from robust_ranking.evaluation.checkpoints import instantiate, load_ranker, run_config
from robust_ranking.evaluation.errors import EvaluationError

VARIANTS = ("basic", "apd", "aod")


def load_pq_run(ckpt: str | Path) -> tuple[torch.nn.Module, torch.Tensor]:
    """A PQ ranker (eval mode) and its run's query images, through the engine's safe loaders."""
    try:
        model_section, data_section, where = run_config(Path(ckpt), None)
        model = load_ranker(Path(ckpt), model_section, where).eval()
        if data_section is None:
            raise EvaluationError(f"{where}: no data section")
        datamodule = instantiate(data_section, RetrievalDataModule, "data", where)
        datamodule.setup("test")
    except EvaluationError as err:
        raise SystemExit(f"error: {err}") from None
    if "codebooks" not in model.capabilities or datamodule.protocol != "query_database":
        raise SystemExit(f"error: {ckpt}: needs a PQ ranker (codebooks) and a data config with protocol: query_database")
    return model, dataset_tensors(datamodule.query_set)[0]


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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="LABEL=<PQ ranker checkpoint>")
    parser.add_argument("--num-queries", type=int, default=250, help="the first N queries of the split")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    out = {}
    print("| model | variant | mean L1 grad at y | mean L1 grad at random start |")
    print("| --- | --- | --- | --- |")
    for item in args.models:
        label, sep, ckpt = item.partition("=")
        if not sep or not label or not ckpt:
            raise SystemExit(f"error: want LABEL=CHECKPOINT, got {item!r}")
        model, queries = load_pq_run(ckpt)
        images = queries[: args.num_queries]
        idx = torch.arange(len(images))
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


    return out


if __name__ == "__main__":
    main()
