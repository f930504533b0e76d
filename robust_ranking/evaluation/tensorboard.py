"""TensorBoard writing of a robustness evaluation: one code path for ``eval.py`` and the callback.

Everything here takes a plain :class:`torch.utils.tensorboard.SummaryWriter` (or anything with its
``add_scalar`` / ``add_image`` / ``add_text`` / ``add_figure`` API and a ``file_writer``), so the
:class:`callbacks.RobustnessEvaluation` callback (``logger.experiment`` of a Lightning
``TensorBoardLogger``, used by ``eval.py`` and during training) and the universal runner's own
writer can share it. Tags (``<a>`` = attack, ``<e>`` = epsilon, ``<k>`` = w / m):

- scalars ``robust/<a>/eps=<e>/<w|m>=<k>`` (mean metric of a cell), ``robust/score`` and its
  per-attack components ``robust/score/<a>``, and ``robust/ers`` (RobRank's ERS, only when the suite
  ran all ten ERS terms; :func:`scalar_values`; the callback logs them through
  ``pl_module.log`` so they also reach ``callback_metrics``);
- images ``robust_images/<a> eps=<e> [w|m=<k>] (clean|adv|perturbation)``: a grid of three rows,
  clean / adversarial / perturbation rescaled so that gray = 0 and black / white = -eps / +eps
  (:func:`example_grid`), one per attack and EVERY epsilon (smallest w / m);
- images ``robust_strips/<a> eps=<e> [w|m=<k>] (before|after)``: retrieval strips of the attacks
  that perturb a query (QA, ES, PQ-AG, hashing; :func:`retrieval_strip`) and text
  ``robust_strips/<same> legend``: per query, the top-k before (upper row) and after (middle row)
  the attack, and the attack's targets (lower row, QA / DHTA), frames green = query's class (the
  goal class for targeted hashing attacks), red = another class, blue = a target, gray = the query;
- figures ``robust_curves/<a>``: the metric against eps per w / m, eps = 0 being the clean value
  (:func:`curve_figure`; the reports save the same figure as PNG next to their Markdown);
- hparams (:func:`write_hparams`): the HParams tab's session with the run's settings and the metrics
  ``hparams/clean_recall@1``, ``hparams/clean_map``, ``hparams/robust_score`` and
  ``hparams/robust_score/<a>`` (and ``hparams/ers`` when the suite ran RobRank's ten ERS attacks), so that
  several checkpoints (one sub-run each) compare side by side.

The universal runner (:mod:`evaluation.universal`) writes the same kinds of entries with these
functions: ``robust_images/<config> ...`` grids, ``robust_curves/<attack>``, an HParams session.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.utils import make_grid

from robust_ranking.data.retrieval_batch import collate_retrieval_batch
from robust_ranking.retrieval.index import stable_topk
from robust_ranking.evaluation.score import ERS

__all__ = [
    "HPARAM_METRICS_PREFIX",
    "curve_figure",
    "curve_rows",
    "example_grid",
    "hparam_metrics",
    "retrieval_strip",
    "scalar_values",
    "write_curves",
    "write_evaluation",
    "write_examples",
    "write_hparams",
    "write_scalars",
]

HPARAM_METRICS_PREFIX = "hparams"
_GREEN = (0.1, 0.75, 0.1)
_RED = (0.85, 0.1, 0.1)
_BLUE = (0.15, 0.35, 0.95)
_GRAY = (0.6, 0.6, 0.6)
_METRIC_AXES = {"rank": "mean normalized rank (%)", "shift": "mean embedding shift", "ap": "mAP (AP@topk)",
                "ap_sdc": "mAP (SDC)", "cos": "mean cos(f(q~), f(t))", "recall@1": "Recall@1 (%)",
                "retain@4": "clean top-1 retained in top 4 (%)"}


# --------------------------------------------------------------------------- scalars
def scalar_values(results: Any) -> dict[str, float]:
    """``robust/<attack>/eps=<e>/<w|m>=<k>`` -> mean metric, ``robust/score``, ``robust/score/<attack>``, ``robust/ers``.

    Invalid cells (non-finite numbers) have no value to plot and are left out; the report says why.
    """
    out: dict[str, float] = {}
    for r in results.results:
        if r.invalid:
            continue
        key = f"robust/{r.attack}/eps={r.eps:g}"
        if r.size_key is not None:
            key += f"/{r.size_key}={r.size}"
        out[key] = float(r.mean)
    if results.score.value is not None:
        out["robust/score"] = float(results.score.value)
        out.update({f"robust/score/{a}": float(v) for a, v in results.score.per_attack.items()})
    ers = ERS.from_results(results.results)
    if ers.value is not None:  # RobRank's ERS: only with all ten terms (the report says which are missing)
        out["robust/ers"] = float(ers.value)
    return out


def write_scalars(writer: Any, results: Any, step: int) -> None:
    """:func:`scalar_values` as plain SummaryWriter scalars (for writers outside Lightning)."""
    for tag, value in scalar_values(results).items():
        writer.add_scalar(tag, value, step)


# --------------------------------------------------------------------------- hparams
def hparam_metrics(clean: Mapping[str, float] | None, score: Any, ers: float | None = None) -> dict[str, float]:
    """The HParams tab's metrics: clean R@1 / mAP, the robustness score and its per-attack parts, and
    RobRank's ERS when the suite ran its ten attacks (``ers``: :class:`evaluation.score.ERS`'s value)."""
    p = HPARAM_METRICS_PREFIX
    out: dict[str, float] = {}
    for key in ("recall@1", "map"):
        if clean and clean.get(key) is not None:
            out[f"{p}/clean_{key}"] = float(clean[key])
    if score is not None and score.value is not None:
        out[f"{p}/robust_score"] = float(score.value)
        out.update({f"{p}/robust_score/{a}": float(v) for a, v in score.per_attack.items()})
    if ers is not None:
        out[f"{p}/ers"] = float(ers)
    return out


def write_hparams(writer: Any, hparams: Mapping[str, Any], metrics: Mapping[str, float], step: int = 0) -> None:
    """One HParams session: ``hparams`` (flattened, values made str / float / bool) and ``metrics``
    (also written as scalars at ``step``, where the HParams plugin reads their values)."""
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    params = {k: _hparam_value(v) for k, v in _flatten(hparams).items()}
    exp, ssi, sei = hparams_summary(params, dict(metrics))
    file_writer = writer._get_file_writer() if hasattr(writer, "_get_file_writer") else writer.file_writer
    for summary in (exp, ssi, sei):
        file_writer.add_summary(summary)
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, step)


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def _hparam_value(value: Any) -> Any:
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value)
    return str(value)


# --------------------------------------------------------------------------- example grids
def example_grid(example: Any, num_images: int = 8) -> Tensor:
    """Clean (top row) / adversarial / perturbation (gray = 0, black / white = -eps / +eps) images."""
    n = min(num_images, example.images.shape[0])
    clean, adv = example.images[:n].float(), example.adversarial[:n].float()
    scale = 2.0 * example.eps if example.eps > 0 else 1.0
    perturbation = ((adv - clean) / scale + 0.5).clamp(0.0, 1.0)
    return make_grid(torch.cat([clean, adv, perturbation]), nrow=n, padding=2, pad_value=1.0)


def write_examples(
    writer: Any,
    results: Any,
    step: int,
    *,
    model: Any = None,
    datasets: Mapping[str, Dataset | None] | None = None,
    query_database: Iterable[str] = (),
    num_images: int = 8,
    strip_queries: int = 4,
    strip_topk: int = 8,
) -> list[str]:
    """Example grids of every kept example (one per attack and epsilon) and, with a ``model`` and
    ``datasets`` (``gallery``: X; ``query`` / ``database``: the query / database split), retrieval
    strips with a text legend. ``query_database``: the attacks of the query / database protocol.
    Returns the tags written."""
    tags: list[str] = []
    split = set(query_database)
    datasets = datasets or {}
    for example in results.examples.values():
        tag = f"robust_images/{example.label} (clean|adv|perturbation)"
        writer.add_image(tag, example_grid(example, num_images), step)
        tags.append(tag)
        if model is None or not _query_side(example):
            continue
        if example.attack in split:
            if results.database is None or datasets.get("database") is None:
                continue
            strip = retrieval_strip(model, example, results.database, datasets["database"], queries=strip_queries,
                                    topk=strip_topk, exclude_self=False, codes=True,
                                    query_dataset=datasets.get("query"))
        else:
            if results.gallery is None or datasets.get("gallery") is None:
                continue
            strip = retrieval_strip(model, example, results.gallery, datasets["gallery"], queries=strip_queries,
                                    topk=strip_topk, exclude_self=True, codes=False)
        grid, legend = strip
        tag = f"robust_strips/{example.label} (before|after)"
        writer.add_image(tag, grid, step)
        writer.add_text(f"robust_strips/{example.label} legend", legend, step)
        tags += [tag, f"robust_strips/{example.label} legend"]
    return tags


def _query_side(example: Any) -> bool:
    """Attacks that perturb a query (its ranking list is what changes); CA perturbs candidates."""
    return not example.attack.startswith("CA")


def retrieval_strip(
    model: Any,
    example: Any,
    gallery: Any,
    dataset: Dataset,
    *,
    queries: int = 4,
    topk: int = 8,
    exclude_self: bool = True,
    codes: bool = False,
    query_dataset: Dataset | None = None,
) -> tuple[Tensor, str]:
    """Top-k of ``gallery`` for the example's first queries, before and after the attack.

    Per query: a row [query | top-k] on the clean query, a row [adversarial query | top-k], and a
    row of the attack's targets when it has some (QA candidates, DHTA voting items). ``codes``:
    rank by ``model.encode`` / ``code_distance`` (the database of the query / database protocol)
    instead of ``embed`` / ``distance``; ``exclude_self``: the query is a gallery item (X), not a result;
    ``query_dataset``: where the example's indices point when the queries are not gallery items
    (the query set; their labels color the frames). Returns the image grid and a Markdown legend.
    """
    device = gallery.embeddings.device
    n = min(queries, example.indices.numel())
    k = min(topk, len(gallery) - (1 if exclude_self else 0))
    clean_q = example.images[:n].to(device)
    adv_q = example.adversarial[:n].to(device)
    with torch.inference_mode(False), torch.no_grad():
        represent = model.encode if codes else model.embed
        measure = model.code_distance if codes else model.distance
        d_clean = measure(represent(clean_q), gallery.embeddings).float().clone()
        d_adv = measure(represent(adv_q), gallery.embeddings).float().clone()
        if exclude_self:
            rows = torch.arange(n, device=device)
            self_idx = example.indices[:n].to(device)
            for d in (d_clean, d_adv):
                d[rows, self_idx] = float("inf")
        top_clean, top_adv = stable_topk(d_clean, k)[1], stable_topk(d_adv, k)[1]
    labels = gallery.labels
    if exclude_self:
        query_labels = labels[example.indices[:n].to(device)]
    elif query_dataset is not None:
        query_labels = _labels_of(query_dataset, example.indices[:n]).to(device)
    else:  # unknown: every frame red unless a goal class is given
        query_labels = torch.full((n,), -1, dtype=labels.dtype, device=device)
    goal = example.goal_labels[:n].to(device) if getattr(example, "goal_labels", None) is not None else None
    wanted = goal if goal is not None else query_labels
    targets = example.targets[:n].to(device) if example.targets is not None else None
    if targets is not None and targets.dim() == 1:
        targets = targets[:, None]

    green, red, blue = (torch.tensor(c, device=device) for c in (_GREEN, _RED, _BLUE))
    gray = torch.tensor(_GRAY)
    rows_tiles: list[Tensor] = []
    legend = [f"**{example.label}**: per query, upper row = its top-{k} before the attack, next row = after "
              "(first tile: the clean / adversarial query, gray frame)"
              + ("; last row = the attack's targets (blue)" if targets is not None else "")
              + ". Frames: green = " + ("the goal class" if goal is not None else "the query's class")
              + ", red = another class, blue = a target.", ""]
    blank = torch.ones(3, *_framed(clean_q[:1].cpu(), gray[None]).shape[2:])
    for i in range(n):
        tgt = targets[i][targets[i] >= 0] if targets is not None else None
        lines = []
        for row_name, query_img, top in (("before", clean_q[i], top_clean[i]), ("after", adv_q[i], top_adv[i])):
            colors = torch.where((labels[top] == wanted[i])[:, None], green, red)
            if tgt is not None and tgt.numel():
                colors[(top[:, None] == tgt[None, :]).any(1)] = blue
            tiles = torch.cat([_framed(query_img[None].cpu(), gray[None]),
                               _framed(_fetch(dataset, top.cpu()), colors.cpu())])
            rows_tiles.append(tiles)
            lines.append(f"{row_name}: " + " ".join(f"{int(j)}({int(labels[j])})" for j in top.tolist()))
        if targets is not None:
            shown = tgt[:k] if tgt is not None else tgt
            tiles = [_framed(_fetch(dataset, shown.cpu()), blue.cpu().expand(shown.numel(), 3))] if shown.numel() else []
            row = torch.cat([blank[None], *tiles]) if tiles else blank[None]
            pad = (k + 1) - row.shape[0]
            if pad > 0:
                row = torch.cat([row, blank[None].expand(pad, *blank.shape)])
            rows_tiles.append(row)
            lines.append("targets: " + " ".join(f"{int(j)}({int(labels[j])})" for j in shown.tolist()))
        head = f"- query {int(example.indices[i])} (class {int(query_labels[i])}"
        head += f", goal class {int(goal[i])})" if goal is not None else ")"
        legend.append(head + ", gallery index(class): " + "; ".join(lines))
    grid = make_grid(torch.cat(rows_tiles), nrow=k + 1, padding=2, pad_value=1.0)
    return grid, "\n".join(legend)


def _labels_of(dataset: Dataset, indices: Tensor) -> Tensor:
    loader = DataLoader(dataset, batch_size=max(int(indices.numel()), 1), sampler=indices.tolist(),
                        collate_fn=collate_retrieval_batch)
    return next(iter(loader)).labels


def _fetch(dataset: Dataset, indices: Tensor) -> Tensor:
    """Dataset images by index, in the given order (one batched fetch)."""
    loader = DataLoader(dataset, batch_size=max(int(indices.numel()), 1), sampler=indices.tolist(),
                        collate_fn=collate_retrieval_batch)
    return next(iter(loader)).images


def _framed(images: Tensor, colors: Tensor, width: int = 2) -> Tensor:
    """RGB copies of ``images [B, C, H, W]`` inside a ``width``-pixel frame of ``colors [B, 3]``."""
    images = images.float()
    rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]
    b, _, h, w = rgb.shape
    out = colors.to(rgb.dtype)[:, :, None, None].expand(b, 3, h + 2 * width, w + 2 * width).clone()
    out[:, :, width : width + h, width : width + w] = rgb
    return out


# --------------------------------------------------------------------------- curves
def curve_rows(results: Any) -> list[dict[str, Any]]:
    """Report-style rows (``attack``, ``eps``, ``size_key``, ``<w|m>``, ``metric``, ``mean``, ``std``,
    ``T``, ``clean``, ``invalid``) of a :class:`evaluation.engine.RobustnessResults`."""
    from robust_ranking.evaluation.report import result_row

    return [result_row(r) for r in results.results]


def curve_figure(rows: Sequence[Mapping[str, Any]], attacks: Sequence[str] | None = None) -> Any:
    """Metric vs eps, one panel per attack (all of ``rows``' attacks by default), one line per w / m;
    eps = 0 is the clean value; error bars: standard error std / sqrt(T). ``None`` if nothing to plot."""
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(r["attack"] for r in rows if _plottable(r)))
    if attacks is not None:
        names = [a for a in names if a in attacks]
    if not names:
        return None
    cols = min(len(names), 3)
    nrows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * nrows), layout="constrained")
    for i, attack in enumerate(names):
        ax = fig.add_subplot(nrows, cols, i + 1)
        mine = [r for r in rows if r["attack"] == attack and _plottable(r)]
        key = mine[0].get("size_key")
        for size in dict.fromkeys(r.get(key) if key else None for r in mine):
            line = sorted((r for r in mine if (r.get(key) if key else None) == size), key=lambda r: r["eps"])
            xs = [r["eps"] for r in line]
            ys = [r["mean"] for r in line]
            errs = [(r.get("std") or 0.0) / math.sqrt(max(int(r.get("T") or 1), 1)) for r in line]
            clean = line[0].get("clean")
            if clean is not None and math.isfinite(clean) and 0.0 not in xs:
                xs, ys, errs = [0.0, *xs], [clean, *ys], [0.0, *errs]
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=2, label=f"{key}={size}" if key else attack)
        ax.set_title(attack)
        ax.set_xlabel("eps")
        ax.set_ylabel(_METRIC_AXES.get(mine[0].get("metric"), str(mine[0].get("metric"))))
        ax.grid(alpha=0.3)
        if key:
            ax.legend(fontsize="small")
    return fig


def _plottable(row: Mapping[str, Any]) -> bool:
    mean = row.get("mean")
    return not row.get("invalid") and isinstance(mean, (int, float)) and math.isfinite(mean)


def write_curves(writer: Any, rows: Sequence[Mapping[str, Any]], step: int) -> list[str]:
    """One ``robust_curves/<attack>`` figure per attack. Returns the tags written."""
    tags = []
    for attack in dict.fromkeys(r["attack"] for r in rows if _plottable(r)):
        fig = curve_figure(rows, [attack])
        if fig is not None:
            writer.add_figure(f"robust_curves/{attack}", fig, step, close=False)
            tags.append(f"robust_curves/{attack}")
    return tags


# --------------------------------------------------------------------------- everything
def write_evaluation(
    writer: Any,
    results: Any,
    step: int,
    *,
    images: bool = True,
    scalars: bool = False,
    **example_options: Any,
) -> list[str]:
    """Curves, and with ``images`` the example grids / retrieval strips (see :func:`write_examples`);
    with ``scalars`` also the scalars (the callback logs those through Lightning instead)."""
    tags: list[str] = []
    if scalars:
        write_scalars(writer, results, step)
        tags += list(scalar_values(results))
    tags += write_curves(writer, curve_rows(results), step)
    if images:
        tags += write_examples(writer, results, step, **example_options)
    return tags
