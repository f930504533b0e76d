"""The universal runner: one perturbation per configuration, fitted on a fit set of X and measured
on it and on a disjoint unseen set (ECCV 2020 Table 6 for I-CA / I-QA; UAP-IR mAP / mP@10 / mDR).

One process or DDP (``collectives``; ``eval.py --devices N`` runs it through
:func:`evaluation.launch.run_distributed`): X is embedded in batches split over the ranks; each fit
step takes the per-sample gradients of every rank's slice of the fit batch and sums them in sample
order; the fit / unseen measurements are split by whole batches (:mod:`attacks.universal.sharding`).
Every rank computes the same perturbations and numbers; rank 0 writes
``<ckpt-stem>.<suite-name>.json`` / ``.md`` / ``.pt`` (the perturbations) and the TensorBoard events
(perturbation images, effect curves) under ``<output-dir>/tensorboard/`` or to the ``writer`` given.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from robust_ranking.attacks.gallery import Gallery, QuerySet
from robust_ranking.attacks.transfer import embed_all
from robust_ranking.attacks.universal.uap_retrieval import UAPRetrieval
from robust_ranking.attacks.universal.sharding import single
from robust_ranking.attacks.universal.universal_ranking_attack import fit_unseen_split
from robust_ranking.evaluation.data import check_embeddings, check_images, encode_all, gallery_tensors
from robust_ranking.evaluation.engine import EvaluationInterrupted, clean_metrics
from robust_ranking.evaluation.errors import EvaluationError, one_line
from robust_ranking.evaluation.launch import stop_vote
from robust_ranking.evaluation.registry import UNIVERSAL_ATTACKS
from robust_ranking.evaluation.report import nan_mean, run_metadata, write_outputs
from robust_ranking.evaluation.tensorboard import (
    HPARAM_METRICS_PREFIX,
    example_grid,
    hparam_metrics,
    write_curves,
    write_hparams,
)

__all__ = ["check_universal_model", "config_label", "evaluate_universal", "universal_markdown"]


class _TaggedWriter:
    """Prefixes every TensorBoard tag with the configuration, so eps / resize variants do not collide."""

    def __init__(self, writer: Any, prefix: str) -> None:
        self.writer, self.prefix = writer, prefix

    def add_scalar(self, tag: str, value: float, global_step: int) -> Any:
        return self.writer.add_scalar(f"{self.prefix}/{tag}", value, global_step)

    def add_image(self, tag: str, img: Any, global_step: int) -> Any:
        return self.writer.add_image(f"{self.prefix}/{tag}", img, global_step)


def config_label(config: Any) -> str:
    """``I-CA+ eps=0.3 w=1``, ``UAP-IR:list eps=0.03 resize=[0.5, 1.5]``, ``UAP-IR:pair eps=0.1 negative=nearest``.

    Unique per configuration of a suite (it keys the saved perturbations and the TensorBoard tags).
    """
    resize = config.options.get("resize_range")
    label = config.label + ("" if resize is None else f" resize=[{resize[0]:g}, {resize[1]:g}]")
    others = {k: v for k, v in config.options.items() if k not in ("resize_range", "input_size", "eval_scales")}
    return " ".join([label, *(f"{k}={v}" for k, v in others.items())])


def check_universal_model(model: nn.Module, dataset: Any, suite: Any, where: object) -> None:
    """Fail early (one line) when a UAP-IR entry resizes queries but the model takes only one input size."""
    x = torch.stack([dataset[i][0] for i in range(min(2, len(dataset)))])  # a 2-image probe
    for config in suite.configurations():
        attack = UNIVERSAL_ATTACKS.get(config.attack).build(config.eps, config.size, suite.seed, **config.options)
        if not isinstance(attack, UAPRetrieval):
            continue
        scales = [*attack.eval_scales, *(attack.resize_range or ())]  # type: ignore[attr-defined]
        for scale in scales:
            size = (max(1, round(scale * x.shape[-2])), max(1, round(scale * x.shape[-1])))
            try:
                with torch.no_grad():
                    attack._forward(model.eval(), torch.nn.functional.interpolate(x, size=size, mode="bilinear"))
            except RuntimeError as err:
                raise EvaluationError(
                    f"{where}: {config_label(config)}: the model does not take {size[0]}x{size[1]} inputs "
                    f"({one_line(err)[:120]}); add input_size: [{x.shape[-2]}, {x.shape[-1]}] to the suite entry "
                    "(queries are then resized to the model's input size) or use a backbone with global pooling"
                ) from None


def evaluate_universal(
    model: nn.Module,
    datamodule: Any,
    suite: Any,
    json_path: Path,
    md_path: Path,
    *,
    checkpoint: str,
    title: str,
    device: torch.device | str = "cpu",
    progress: bool = True,
    should_stop: Any = None,
    collectives: Any = None,
    writer: Any = None,
) -> dict[str, Any] | None:
    """Fit every configuration of a universal suite on ``model``; write JSON / Markdown / perturbations.

    ``collectives``: split the work over the ranks of a DDP run (:class:`evaluation.engine.Collectives`;
    every rank calls this with the same arguments). ``writer``: a TensorBoard ``SummaryWriter`` (or
    anything with ``add_scalar`` / ``add_image``) for the effect curves and perturbation images,
    instead of the runner's own under ``<output-dir>/tensorboard/<stem>/``; used on rank 0 only, not
    closed here. Returns the report's data on rank 0, ``None`` on the other ranks.

    Raises:
        InvalidInputError: an image of X is NaN / inf or outside [0, 1].
        NonFiniteEmbeddingsError: the model embeds X with NaN / inf values.
        EvaluationInterrupted: ``should_stop()`` was true (on any rank) between two configurations
            (nothing is resumable: a universal fit starts again).
    """
    with torch.inference_mode(False), torch.enable_grad():  # the attacks differentiate (Lightning tests in no-grad)
        return _evaluate_universal(model, datamodule, suite, json_path, md_path, checkpoint=checkpoint, title=title,
                                   device=device, progress=progress, should_stop=should_stop,
                                   collectives=collectives, writer=writer)


def _evaluate_universal(model: nn.Module, datamodule: Any, suite: Any, json_path: Path, md_path: Path, *,
                        checkpoint: str, title: str, device: torch.device | str, progress: bool, should_stop: Any,
                        collectives: Any, writer: Any) -> dict[str, Any] | None:
    start = time.perf_counter()
    dist = single(collectives)
    main = dist.rank == 0
    progress = progress and main
    model = model.to(device)
    images, labels = gallery_tensors(datamodule)
    images, labels = images.to(device), labels.to(device)
    check_images(images, checkpoint)
    gallery = Gallery(embed_all(model, images, suite.batch_size, collectives), labels)
    check_embeddings(gallery.embeddings, checkpoint)
    clean = None
    if main:  # the report's clean metrics: rank 0 only
        clean = clean_metrics(model, gallery.embeddings, labels, encode_all(model, images, suite.batch_size))
    embed_wall = time.perf_counter() - start
    n = images.shape[0]
    fit, unseen = fit_unseen_split(n, size=suite.fit_size(n), seed=suite.seed)  # disjoint, seeded (Table 6)
    tb_dir = json_path.parent / "tensorboard" / json_path.stem
    own_writer = main and writer is None
    if own_writer:
        writer = SummaryWriter(str(tb_dir))
    tensorboard = str(tb_dir) if own_writer else (getattr(writer, "log_dir", None) if main else None)
    results: list[dict[str, Any]] = []
    perturbations: dict[str, Any] = {}
    total = len(list(suite.configurations()))
    try:
        for config in suite.configurations():
            if stop_vote(collectives, should_stop, device):
                raise EvaluationInterrupted(results, total)
            attack = UNIVERSAL_ATTACKS.get(config.attack).build(config.eps, config.size, suite.seed,
                                                                batch_size=suite.batch_size, **config.options)
            label = config_label(config)
            logger = _TaggedWriter(writer, label.replace(" ", "_")) if main and writer is not None else None
            t0 = time.perf_counter()
            row: dict[str, Any] = {"attack": config.attack, "eps": config.eps, "hparams": attack.hparams,
                                   "options": dict(config.options)}
            if config.size_key:
                row[config.size_key] = config.size
            res = attack(model, gallery, QuerySet(images[fit], fit, labels[fit]),
                         QuerySet(images[unseen], unseen, labels[unseen]), logger=logger, progress=progress,
                         collectives=collectives)
            if isinstance(attack, UAPRetrieval):
                row["resize_range"] = None if attack.resize_range is None else list(attack.resize_range)
                row["fit"], row["unseen"] = res.fit, res.unseen
                # The frozen r at other input sizes (the slides' "effects of resizing"), unseen queries.
                row["unseen_at_scale"] = {
                    f"{s:g}": attack.evaluate(model, gallery, images[unseen], labels[unseen], res.perturbation,
                                              unseen, scale=s, collectives=collectives)
                    for s in attack.eval_scales}  # type: ignore[attr-defined]
            else:
                row["fit"] = {k: nan_mean(v) for k, v in res.fit.items()}
                row["unseen"] = {k: nan_mean(v) for k, v in (res.unseen or {}).items()}
                row["fit_std"] = {k: float(v.double().std()) for k, v in res.fit.items()}
            row["history"], row["wall_s"] = res.history, time.perf_counter() - t0
            results.append(row)
            perturbations[label] = res.perturbation.detach().cpu()
            if main and writer is not None:
                _write_config(writer, label, attack, config.eps, res.perturbation, images[unseen], row)
            if progress:
                print(f"{label}: fit {row['fit']} unseen {row['unseen']} ({row['wall_s']:.0f} s)", file=sys.stderr)
        if main and writer is not None:
            _write_summary(writer, results, clean, suite, checkpoint, type(model).__name__)
    finally:
        if own_writer:
            writer.close()
    if not main:
        return None
    data = {"format": "robust-ranking/universal-report/v1", "checkpoint": checkpoint, "title": title,
            **run_metadata(suite, device), "world_size": int(dist.world_size), "clean": clean, "gallery_size": n,
            "fit_size": int(fit.numel()), "fit_indices": fit.tolist(), "unseen_indices": unseen.tolist(),
            "results": results, "embed_wall_s": embed_wall, "wall_s": time.perf_counter() - start,
            "tensorboard": tensorboard}
    pt_path = json_path.with_suffix(".pt")
    pt_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(perturbations, pt_path)
    return write_outputs(json_path, md_path, data, universal_markdown(data))


def _main_metric(row: dict[str, Any]) -> str:
    """The universal attack's reported quantity: the first non-``*_clean`` metric of its results."""
    return next((k for k in row["unseen"] if not k.endswith("_clean")), next(iter(row["unseen"]), ""))


def _write_config(writer: Any, label: str, attack: Any, eps: float, perturbation: Tensor, unseen_images: Tensor,
                  row: dict[str, Any]) -> None:
    """One configuration's TensorBoard entries (the per-sample runner's tags, see
    :mod:`evaluation.tensorboard`): the final fit / unseen metrics as scalars and an example grid of
    unseen images: clean / with the universal perturbation / the perturbation amplified."""
    tag = label.replace(" ", "_")
    for split in ("fit", "unseen"):
        for metric, value in (row.get(split) or {}).items():
            if isinstance(value, (int, float)):
                writer.add_scalar(f"robust/{tag}/{split}/{metric}", value, 0)
    clean = unseen_images[:8].detach()
    r = perturbation.detach().to(clean)
    if isinstance(attack, UAPRetrieval):
        adversarial = attack.apply(clean, r)
    else:
        adversarial = (clean + r).clamp(0.0, 1.0)
    grid = example_grid(SimpleNamespace(images=clean.cpu(), adversarial=adversarial.detach().cpu(), eps=eps))
    writer.add_image(f"robust_images/{label} (clean|adv|perturbation)", grid, 0)
    writer.add_text(f"robust_images/{label} legend",
                    "rows: clean unseen images / with the universal perturbation / the perturbation "
                    f"(gray = 0, black / white = -eps / +eps), eps = {eps:g}", 0)


def _write_summary(writer: Any, results: list[dict[str, Any]], clean: Any, suite: Any, checkpoint: str,
                   model_name: str) -> None:
    """Metric-vs-eps curves per attack (unseen queries) and the HParams session (clean metrics and
    each configuration's final unseen value), as the per-sample runner writes them."""
    rows = []
    for row in results:
        if not row.get("unseen"):
            continue
        metric = _main_metric(row)
        size_key = "w" if "w" in row else ("m" if "m" in row else None)
        clean_value = row["unseen"].get(f"{metric}_clean")
        rows.append({"attack": config_label_of(row), "eps": row["eps"], "size_key": size_key,
                     **({size_key: row[size_key]} if size_key else {}), "metric": metric,
                     "mean": row["unseen"][metric], "std": None, "T": None, "clean": clean_value, "invalid": False})
    write_curves(writer, rows, 0)
    metrics = hparam_metrics(clean, None)
    for row in rows:
        metrics[f"{HPARAM_METRICS_PREFIX}/{row['attack']} eps={row['eps']:g}".replace(" ", "_")] = float(row["mean"])
    write_hparams(writer, {"suite": suite.name, "checkpoint": checkpoint, "model": model_name}, metrics)


def config_label_of(row: dict[str, Any]) -> str:
    """The attack's name with its distinguishing options (``UAP-IR:pair resize=[0.75, 1.25]``)."""
    extra = [f"{k}={v}" for k, v in (row.get("options") or {}).items() if k not in ("epochs", "input_size")]
    if row.get("resize_range"):
        extra.append(f"resize={row['resize_range']}")
    return " ".join([row["attack"], *extra])


def universal_markdown(data: dict[str, Any]) -> str:
    """Table 6 layout for I-CA / I-QA (rows eps x set, cells clean→adversarial) and a UAP-IR table."""
    lines = [f"# Universal perturbations: {data['title']} ({data['suite']['name']})", "",
             f"fit set: {data['fit_size']} samples of X, unseen set: {data['fit_size']} others "
             f"(|X| = {data['gallery_size']}, seed {data['seed']}); clean R@1 {data['clean']['recall@1']:.4f}, "
             f"mAP {data['clean']['map']:.4f}; wall {data['wall_s']:.0f} s", ""]
    ranking = [r for r in data["results"] if "resize_range" not in r]
    uap = [r for r in data["results"] if "resize_range" in r]
    if ranking:
        def column(r: dict[str, Any]) -> str:  # "I-CA+ w=1", "I-CA+ w=1 shared" (one target set for all)
            shared = " shared" if r["hparams"].get("shared_targets") else ""
            return f"{r['attack']} {'w' if 'w' in r else 'm'}={r.get('w', r.get('m'))}{shared}"

        columns: list[str] = []
        for r in ranking:
            col = column(r)
            if col not in columns:
                columns.append(col)
        lines += ["| ε | set | " + " | ".join(columns) + " |", "| --- | --- |" + " ---: |" * len(columns)]
        for eps in sorted({r["eps"] for r in ranking}):
            for split in ("fit", "unseen"):
                cells = []
                for col in columns:
                    match = [r for r in ranking if r["eps"] == eps and column(r) == col]
                    cells.append(f"{match[0][split]['rank_clean']:.1f}→{match[0][split]['rank']:.1f}"
                                 if match and match[0][split] else "")
                lines.append(f"| {eps:g} | {'seen (fit)' if split == 'fit' else 'unseen'} | " + " | ".join(cells) + " |")
        lines += ["", "Cells: mean normalized rank (%) of the attacked candidates (I-CA) / targets (I-QA), "
                  "clean→with the universal perturbation; \"+\" lowers it, \"-\" raises it.", ""]
    if uap:
        scales = sorted({s for r in uap for s in r["unseen_at_scale"] if s != "1"}, key=float)
        shown = ("resize_range", "input_size", "eval_scales")  # in their own columns / the suite

        def variant(r: dict[str, Any]) -> str:  # the entry's other options, e.g. "negative=nearest"
            return " ".join(f"{k}={v}" for k, v in r.get("options", {}).items() if k not in shown)

        with_options = any(variant(r) for r in uap)
        head = ["attack", *(["options"] if with_options else []), "ε", "resize range", "set", "mAP clean", "mAP",
                "mP@10 clean", "mP@10", "mDR"]
        head += [f"mDR unseen @{s}x" for s in scales]
        left = 5 if with_options else 4
        lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * left + " ---: |" * (len(head) - left)]
        for r in uap:
            resize = "none" if r["resize_range"] is None else f"[{r['resize_range'][0]:g}, {r['resize_range'][1]:g}]"
            for split in ("fit", "unseen"):
                m = r[split]
                cells = [r["attack"], *([variant(r)] if with_options else []), f"{r['eps']:g}", resize, split,
                         *(f"{m[k]:.3f}" for k in ("mAP_clean", "mAP", "mP@10_clean", "mP@10", "mDR"))]
                cells += [f"{r['unseen_at_scale'][s]['mDR']:.3f}" if split == "unseen" and s in r["unseen_at_scale"]
                          else "" for s in scales]
                lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "mAP over the whole ranking of X (self excluded), mP@10, mDR = (mAP_clean - mAP) / mAP_clean.",
                  ""]
    return "\n".join(lines).rstrip("\n") + "\n"
