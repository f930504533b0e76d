"""Robustness reports: JSON (everything) and Markdown tables laid out like the ECCV 2020 tables.

JSON (``Report.data``, format ``robust-ranking/robustness-report/v1``): every result (attack,
eps, w / m, mean / std of the metric over the T attacked samples, T, wall time, clean value,
``sp_rank`` for QA, the resolved attack hyper-parameters), the skipped entries with their
reason, the exact suite, the checkpoint path, clean Recall@1 / mAP, with a query / database
split also ``clean_query_database`` (every query against the database: SDHA Table 1's metrics for
hashing rankers, SDC / ADC mAP and mAP@1000 for PQ rankers), the robustness score,
versions (python, torch, pytorch-lightning, the project's git commit), seed and world size.

Markdown (:meth:`Report.to_markdown`), after Zhou et al., ECCV 2020, Table 1: rows are the
epsilons with a first row eps = 0 holding the clean values; column groups CA+, CA-, QA+, QA-
(in suite order), each with its w / m values; normalized ranks with one decimal, "%" omitted.
ES (mean embedding shift per eps) and the QA semantics-preserving ranks get small tables of
their own; the robustness score and clean Recall@1 / mAP come first.
:meth:`Report.comparison_markdown` puts several checkpoints side by side, one block of rows per
checkpoint (like Table 3's CT and CTD blocks).

Files are written atomically (a temporary file renamed at the end), so an interrupted run
never leaves a half-written report in place of a finished one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from robust_ranking.evaluation.score import ERS, ERS_ONLY_ATTACKS, ERS_TERMS

__all__ = ["Report", "config_result_from_row", "nan_mean", "result_row", "run_metadata", "write_atomic", "write_outputs"]

FORMAT = "robust-ranking/robustness-report/v1"
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _umask() -> int:
    """The process umask (read by setting it and putting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder + ``os.replace``.

    The file gets the permissions of a plainly created one (``0o666`` less the umask, usually
    0644), not the 0600 of the temporary file, so reports stay readable by the user's group.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_outputs(json_path: Path, md_path: Path, data: dict[str, Any], markdown: str) -> dict[str, Any]:
    """Markdown first, JSON last (both atomic), as :meth:`Report.write` does; for the universal and
    transfer reports. Returns the data as written (JSON types: tuples become lists)."""
    text = json.dumps(data, indent=2, allow_nan=True) + "\n"
    write_atomic(md_path, markdown)
    write_atomic(json_path, text)
    return json.loads(text)


def run_metadata(suite: Any, device: Any) -> dict[str, Any]:
    """The suite as run, seed, versions, device and time: the common head of the universal / transfer reports."""
    return {"suite": suite.to_dict(), "suite_file": suite.source, "seed": suite.seed,
            "versions": Report.environment(), "device": str(device),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _git_commit() -> dict[str, Any] | None:
    """The project's git commit (and whether the tree has local changes), if git is available."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_PROJECT_ROOT, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_PROJECT_ROOT,
                                capture_output=True, text=True, timeout=10)
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def nan_mean(values: Any) -> float:
    """Mean of a tensor of per-sample values in float64, NaN (padding, undefined) ignored: a report cell."""
    return float(values.double().nanmean())


def result_row(r: Any) -> dict[str, Any]:
    """The JSON row of one :class:`evaluation.engine.ConfigResult`.

    An invalid result keeps no numbers (``mean`` / ``std`` / ``clean`` are null) and says why in
    ``invalid``, so nothing downstream can read a score out of it.
    """
    row: dict[str, Any] = {"attack": r.attack, "eps": r.eps}
    if r.size_key is not None:
        row[r.size_key] = r.size
    invalid = getattr(r, "invalid", None)
    row.update({
        "size_key": r.size_key,
        "metric": r.metric,
        "mean": None if invalid else r.mean,
        "std": None if invalid else r.std,
        "T": r.count,
        "wall_s": round(r.wall_s, 4),
        "clean": None if invalid else r.clean,
        "direction": r.direction,
    })
    row.update(dict(r.extra))
    row["hparams"] = dict(r.hparams)
    row["invalid"] = invalid
    row["diagnostics"] = dict(getattr(r, "diagnostics", {}) or {})
    row["spec_index"] = getattr(r, "spec_index", None)
    trace = getattr(r, "trace", None)
    if trace is not None:  # suites with traces: true (the rows of other suites stay as they were)
        row["trace"] = dict(trace)
    return row


def config_result_from_row(row: dict[str, Any]) -> Any:
    """The :class:`evaluation.engine.ConfigResult` a JSON row was written from (for resuming)."""
    from robust_ranking.evaluation.engine import ConfigResult

    known = {"attack", "eps", "size_key", "metric", "mean", "std", "T", "wall_s", "clean", "direction", "hparams",
             "invalid", "diagnostics", "spec_index", "trace"}
    size_key = row.get("size_key")
    if size_key:
        known.add(size_key)
    def number(value: Any) -> float:  # invalid rows store null
        return math.nan if value is None else float(value)

    return ConfigResult(
        attack=row["attack"], eps=float(row["eps"]), size_key=size_key, size=row.get(size_key) if size_key else None,
        metric=row["metric"], mean=number(row["mean"]), std=number(row["std"]), count=int(row["T"]),
        wall_s=float(row["wall_s"]), clean=row.get("clean"), direction=row.get("direction"),
        extra={k: v for k, v in row.items() if k not in known}, hparams=dict(row.get("hparams") or {}),
        invalid=row.get("invalid"), diagnostics=dict(row.get("diagnostics") or {}), spec_index=row.get("spec_index"),
        trace=row.get("trace"),
    )


def sanity_row(check: Any) -> dict[str, Any]:
    """The JSON row of one :class:`evaluation.engine.SanityCheck`."""
    return {**result_row(check.result), "threshold": check.threshold, "passed": check.passed}


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _fmt_eps(eps: float) -> str:
    return f"{eps:g}"


class Report:
    """A robustness report of one checkpoint (or one in-training evaluation).

    Args:
        data: the JSON-able report (see the module docstring); build it with
            :meth:`from_results` or read it with :meth:`load`.
    """

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_results(
        cls,
        results: Any,
        checkpoint: str | None = None,
        title: str | None = None,
        meta: dict[str, Any] | None = None,
        include_environment: bool = True,
    ) -> Report:
        """Build the report of a :class:`evaluation.engine.RobustnessResults`."""
        suite = results.suite
        rows = [result_row(r) for r in results.results]
        data: dict[str, Any] = {
            "format": FORMAT,
            "title": title or (Path(checkpoint).name if checkpoint else suite.name),
            "checkpoint": str(checkpoint) if checkpoint else None,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "suite": suite.to_dict(),
            "suite_file": suite.source,
            "seed": suite.seed,
            "world_size": results.world_size,
            "gallery_size": results.gallery_size,
            "num_samples": results.num_samples,
            "clean": results.clean,
            "robustness_score": results.score.value,
            "score_per_attack": results.score.per_attack,
            "score_invalid": results.score.invalid or getattr(results, "invalid", None),
            "ers": ERS.from_results(results.results).to_dict(),  # RobRank's ERS (None unless all ten terms ran)
            "warnings": list(getattr(results, "warnings", [])),
            "results": rows,
            "sanity": [sanity_row(c) for c in getattr(results, "sanity", [])],
            "skipped": [
                {"attack": s.attack, "reason": s.reason, "epsilons": list(s.epsilons),
                 **({s.size_key: list(s.sizes)} if s.size_key else {})}
                for s in results.skipped
            ],
            "wall_s": round(results.wall_s, 3),
            "embed_wall_s": round(results.embed_wall_s, 3),
            "attacked_indices": results.attacked_indices,
        }
        clean_split = getattr(results, "clean_query_database", None)
        if clean_split is not None:  # data with a query / database split (engine.clean_query_database_metrics)
            data["clean_query_database"] = clean_split
        if include_environment:
            data["versions"] = cls.environment()
        if meta:
            data["meta"] = meta
        return cls(data)

    @staticmethod
    def partial_json(suite: Any, finished: Sequence[Any], meta: dict[str, Any] | None = None) -> str:
        """A progress file for a running evaluation: the suite and the configurations finished so far."""
        data = {"format": FORMAT, "partial": True, "suite": suite.to_dict(), "suite_file": suite.source,
                "results": [result_row(r) for r in finished], "meta": meta or {}}
        return json.dumps(data, indent=2, allow_nan=True) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> Report:
        return cls(json.loads(Path(path).read_text()))

    @staticmethod
    def environment() -> dict[str, Any]:
        """Versions of python, torch, pytorch-lightning and the project's git commit."""
        import pytorch_lightning
        import torch

        git = _git_commit()
        return {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pytorch_lightning": pytorch_lightning.__version__,
            "project_commit": git["commit"] if git else None,
            "project_dirty": git["dirty"] if git else None,
        }

    # ------------------------------------------------------------------ output
    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, allow_nan=True) + "\n"

    def write(self, json_path: str | Path, markdown_path: str | Path | None = None, figures: bool = True) -> None:
        """Write the JSON (and Markdown) atomically; the Markdown first, the JSON last, so a
        finished JSON always has its table next to it. With the Markdown (and ``figures``), the
        metric-vs-eps curves are saved as ``<md-stem>.curves.png`` beside it, linked from it and
        named in the JSON's ``figures``."""
        if markdown_path is not None:
            if figures:
                png = self.write_curves(Path(markdown_path).with_suffix(".curves.png"))
                if png is not None:
                    self.data["figures"] = [png.name]
            write_atomic(markdown_path, self.to_markdown())
        write_atomic(json_path, self.to_json())

    def write_curves(self, path: str | Path) -> Path | None:
        """The metric-vs-eps figure of the results (one panel per attack; the same figure as the
        TensorBoard ``robust_curves/*``), as a PNG written atomically; ``None`` if nothing to plot."""
        from robust_ranking.evaluation.tensorboard import curve_figure

        fig = curve_figure(self.data.get("results", []))
        if fig is None:
            return None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            fig.savefig(tmp, format="png", dpi=100)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def to_markdown(self) -> str:
        d = self.data
        lines = [f"# Robustness: {d['title']}", ""]
        lines += _warning_lines(d)
        lines += self._summary_lines()
        lines += [""]
        for name in d.get("figures") or []:
            lines += [f"![metric vs eps per attack (eps = 0: clean)]({name})", ""]
        rank_table = _rank_table([(None, d)])
        if rank_table:
            lines += ["Normalized rank R (%, omitted) of the attacked candidates (CA) / target candidates "
                      "(QA), mean over the T attacks; the eps = 0 row holds the clean ranks "
                      "(Zhou et al., ECCV 2020, Table 1 layout).", ""]
            lines += rank_table + [""]
        sp = _sp_table([(None, d)])
        if sp:
            lines += ["Semantics preservation: mean rank (%) of the top-G candidates C_SP of the attacked "
                      "query, largest over m.", ""] + sp + [""]
        for metric, table in _other_tables([(None, d)]).items():
            lines += [f"{_METRIC_TITLES.get(metric, metric)}", ""] + table + [""]
        invalid = [r for r in d["results"] if r.get("invalid")]
        if invalid:
            lines += ["Invalid configurations (no numbers, not scored):", ""]
            lines += [f"- {_row_label(r)}: invalid: {r['invalid']}" for r in invalid]
            lines += [""]
        lines += _sanity_lines(d)
        if d.get("skipped"):
            lines += ["Skipped:", ""]
            lines += [f"- {s['attack']}: {s['reason']}" for s in d["skipped"]]
            lines += [""]
        return "\n".join(lines).rstrip() + "\n"

    def _summary_lines(self) -> list[str]:
        d = self.data
        score = d.get("robustness_score")
        parts = [f"**robustness score {_fmt(score, 3)}**"]
        if score is None and d.get("score_invalid"):
            parts = [f"**robustness score: none** ({d['score_invalid']})"]
        per_attack = d.get("score_per_attack") or {}
        if per_attack:
            parts[0] += " (" + ", ".join(f"{a} {v:.3f}" for a, v in per_attack.items()) + ")"
        clean = d.get("clean") or {}
        if "recall@1" in clean:
            parts.append(f"clean R@1 = {100 * clean['recall@1']:.1f}%")
        if "map" in clean:
            parts.append(f"mAP = {100 * clean['map']:.1f}%")
        suite = d["suite"]
        lines = [" · ".join(parts), ""]
        lines += _ers_lines(d)
        lines += _query_database_lines(d.get("clean_query_database"))
        where = f" ({d['suite_file']})" if d.get("suite_file") else ""
        lines.append(
            f"Suite `{suite['name']}`{where}: T = {d['num_samples']} attacked samples of "
            f"|X| = {d['gallery_size']}, seed {d['seed']}, world size {d['world_size']}, {d['wall_s']:.1f} s."
        )
        if d.get("checkpoint"):
            lines.append(f"Checkpoint: `{d['checkpoint']}`.")
        return lines

    @staticmethod
    def comparison_markdown(reports: Sequence[Report], title: str = "Robustness comparison") -> str:
        """Several checkpoints side by side: rows eps, one block per checkpoint (ECCV 2020 Table 3)."""
        labelled: list[tuple[str | None, dict[str, Any]]] = []
        seen: set[str] = set()
        for i, report in enumerate(reports):
            label = _block_label(report.data, i)
            if label in seen:  # blocks are keyed by label: keep them distinct
                label = f"{label} ({i + 1})"
            seen.add(label)
            labelled.append((label, report.data))
        lines = [f"# {title}", ""]
        # RobRank's ERS beside the score when a report has it (suites running all ten ERS attacks)
        with_ers = any((d.get("ers") or {}).get("value") is not None for _, d in labelled)
        lines += ["| checkpoint | robustness score |" + (" ERS |" if with_ers else "") + " clean R@1 | mAP | suite | T |",
                  "| --- | ---: |" + (" ---: |" if with_ers else "") + " ---: | ---: | --- | ---: |"]
        for label, d in labelled:
            clean = d.get("clean") or {}
            r1 = _fmt(100 * clean["recall@1"]) if "recall@1" in clean else "–"
            mean_ap = _fmt(100 * clean["map"]) if "map" in clean else "–"
            ers = f" {_fmt((d.get('ers') or {}).get('value'))} |" if with_ers else ""
            lines.append(f"| {label} | {_fmt(d.get('robustness_score'), 3)} |{ers} {r1} | {mean_ap} | "
                         f"{d['suite']['name']} | {d['num_samples']} |")
        lines.append("")
        rank_table = _rank_table(labelled)
        if rank_table:
            lines += ["Normalized rank R (%, omitted); eps = 0 rows hold the clean ranks.", ""]
            lines += rank_table + [""]
        sp = _sp_table(labelled)
        if sp:
            lines += ["Semantics preservation: rank (%) of C_SP, largest over m.", ""] + sp + [""]
        for metric, table in _other_tables(labelled).items():
            lines += [f"{_METRIC_TITLES.get(metric, metric)}", ""] + table + [""]
        for label, d in labelled:
            for s in d.get("skipped", []):
                lines.append(f"- {label}: {s['attack']} skipped ({s['reason']})")
        return "\n".join(lines).rstrip() + "\n"


#: The scalar metrics of a report's ``clean_query_database`` section, per ranker family, in print order.
_QUERY_DATABASE_METRICS = {
    "hashing": (("map@1000", "mAP@1000"), ("map", "mAP"), ("map@H<=2", "mAP@H<=2"), ("precision@H<=2", "P@H<=2")),
    "product_quantization": (("sdc_map", "SDC mAP"), ("sdc_map@1000", "SDC mAP@1000"), ("adc_map", "ADC mAP"),
                             ("adc_map@1000", "ADC mAP@1000")),
    "metric": (("recall@1", "R@1"), ("map", "mAP"), ("map@r", "MAP@R")),
}
_QUERY_DATABASE_RANKING = {"hashing": "Hamming ranking", "product_quantization": "SDC / ADC ranking",
                           "metric": "ranked by the codes"}


def _query_database_lines(section: dict[str, Any] | None) -> list[str]:
    """The clean query / database metrics (percent) as one Markdown line, if the report has them."""
    if not section:
        return []
    family = section.get("family", "metric")
    values = [f"{label} = {_fmt(100 * section[key]) if section.get(key) is not None else '–'}%"
              for key, label in _QUERY_DATABASE_METRICS.get(family, ()) if key in section]
    bits = f", {section['bits']} bits" if section.get("bits") is not None else ""
    return [f"Clean query / database retrieval ({section.get('queries')} queries against "
            f"{section.get('database')} database items, {_QUERY_DATABASE_RANKING.get(family, family)}{bits}): "
            + " · ".join(values), ""]


def _ers_lines(d: dict[str, Any]) -> list[str]:
    """RobRank's ERS and its ten terms, when the report has it or ran one of the ERS-only attacks
    (then the line says which terms are missing); nothing for other suites."""
    ers = d.get("ers") or {}
    ran_ers_attack = any(r.get("attack") in ERS_ONLY_ATTACKS for r in d.get("results", []))
    if ers.get("value") is None and not ran_ers_attack:
        return []
    terms = ers.get("terms") or {}
    listed = ", ".join(f"{t} {_fmt(terms[t])}" for t, _, _ in ERS_TERMS if t in terms)
    if ers.get("value") is None:
        return [f"**ERS: none** ({ers.get('reason')})" + (f"; terms: {listed}" if listed else ""), ""]
    return [f"**ERS {_fmt(ers['value'])}** (RobRank's empirical robustness score, 0-100, mean of: {listed})", ""]


def _row_label(r: dict[str, Any]) -> str:
    size = f" {r['size_key']}={r[r['size_key']]}" if r.get("size_key") else ""
    return f"{r['attack']} eps={r['eps']:g}{size}"


def _warning_lines(d: dict[str, Any]) -> list[str]:
    """Block quotes at the top of a report: why there is no score, failed sanity checks."""
    lines = []
    if d.get("robustness_score") is None and d.get("score_invalid"):
        lines.append(f"> **INVALID: no robustness score.** {d['score_invalid']}")
    lines += [f"> **Warning:** {w}" for w in d.get("warnings") or []]
    return lines + [""] if lines else []


def _sanity_lines(d: dict[str, Any]) -> list[str]:
    """The sanity-check table (large-budget configurations that must nearly always succeed)."""
    rows = d.get("sanity") or []
    if not rows:
        return []
    lines = ["Sanity checks (an attack without a real budget must nearly always succeed; not scored):", "",
             "| attack | ε | steps | T | mean rank | needs | zero / NaN gradient at step 1 | passed |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        goal = ("≤ " if r["direction"] == "+" else "≥ ") + f"{r['threshold']:g}"
        fraction = (r.get("diagnostics") or {}).get("zero_or_nonfinite_grad_fraction")
        grad = "–" if fraction is None else f"{100 * fraction:.0f}%"
        mean = "invalid" if r.get("invalid") else _fmt(r["mean"])
        size = f" {r['size_key']}={r[r['size_key']]}" if r.get("size_key") else ""
        lines.append(f"| {r['attack']}{size} | {r['eps']:g} | {r['hparams'].get('steps', '–')} | {r['T']} | {mean} | "
                     f"{goal} | {grad} | {'yes' if r['passed'] else '**no**'} |")
    return lines + [""]


_METRIC_TITLES = {"shift": "Maximum embedding shift (ES): mean d(f(x~), f(x)) ± std per eps.",
                  "cos": "Targeted mismatch (TMA): mean cos(f(q~), f(t)) ± std per eps.",
                  "recall@1": "Recall@1 (%) of the attacked queries (ES:R, LTM, GTM), mean ± std per eps.",
                  "retain@4": "GTT: clean top-1 still in the top 4 (%), mean ± std per eps."}


def _block_label(d: dict[str, Any], i: int) -> str:
    return d.get("title") or f"checkpoint {i + 1}"


Blocks = list[tuple[str | None, dict[str, Any]]]  # (block label or None, report data)
Column = tuple[str, str | None, int | None]  # (attack, size key, size)


def _columns(blocks: Blocks, metric: str) -> list[Column]:
    """(attack, size_key, size) columns of a metric, attacks in first-seen order, sizes ascending."""
    order: dict[str, set] = {}
    keys: dict[str, str | None] = {}
    for _, d in blocks:
        for r in d["results"]:
            if r["metric"] != metric:
                continue
            order.setdefault(r["attack"], set()).add(r.get(r["size_key"]) if r["size_key"] else None)
            keys[r["attack"]] = r["size_key"]
    columns = []
    for attack, sizes in order.items():
        for size in sorted(sizes, key=lambda s: -1 if s is None else s):
            columns.append((attack, keys[attack], size))
    return columns


def _lookup(d: dict[str, Any], attack: str, size: int | None, eps: float | None, metric: str) -> dict | None:
    for r in d["results"]:
        if r["metric"] != metric or r["attack"] != attack:
            continue
        r_size = r.get(r["size_key"]) if r["size_key"] else None
        if r_size == size and (eps is None or r["eps"] == eps):
            return r
    return None


def _header(columns: list[Column], first: str = "ε") -> list[str]:
    cells, previous = [first], None
    for attack, size_key, size in columns:
        if size_key is None:
            cells.append(attack)
        elif attack != previous:
            cells.append(f"{attack} {size_key}={size}")
        else:
            cells.append(str(size))
        previous = attack
    return ["| " + " | ".join(cells) + " |", "| --- |" + " ---: |" * len(columns)]


def _epsilons(blocks: Blocks, metrics: set[str]) -> list[float]:
    return sorted({r["eps"] for _, d in blocks for r in d["results"] if r["metric"] in metrics})


def _rank_table(blocks: Blocks) -> list[str]:
    columns = _columns(blocks, "rank")
    if not columns:
        return []
    lines = _header(columns)
    epsilons = [e for e in _epsilons(blocks, {"rank"}) if e != 0]
    for label, d in blocks:
        if label is not None:  # a block header row, like "(CTD) Cosine Distance, ..." in Table 3
            clean = d.get("clean") or {}
            r1 = f", R@1 = {100 * clean['recall@1']:.1f}%" if "recall@1" in clean else ""
            score = f", score {_fmt(d.get('robustness_score'), 3)}"
            lines.append(f"| **{label}**{r1}{score} |" + " |" * len(columns))
        clean_cells = []
        for attack, _, size in columns:
            r = _lookup(d, attack, size, None, "rank")
            clean_cells.append(_fmt(r["clean"]) if r else "–")
        lines.append("| 0 | " + " | ".join(clean_cells) + " |")
        for eps in epsilons:
            cells = []
            for attack, _, size in columns:
                r = _lookup(d, attack, size, eps, "rank")
                cells.append(("invalid" if r.get("invalid") else _fmt(r["mean"])) if r else "–")
            lines.append(f"| {_fmt_eps(eps)} | " + " | ".join(cells) + " |")
    return lines


def _sp_table(blocks: Blocks) -> list[str]:
    """Rows eps, one column per QA attack (and block): the largest mean C_SP rank over m."""
    columns: list[tuple[str | None, str]] = []
    for label, d in blocks:
        for r in d["results"]:
            key = (label, r["attack"])
            if r.get("sp_rank") is not None and key not in columns:
                columns.append(key)
    if not columns:
        return []
    names = [attack if label is None else f"{label}: {attack}" for label, attack in columns]
    lines = ["| ε | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(columns)]
    data = dict(blocks)
    epsilons = _epsilons(blocks, {"rank"})
    rows: list[tuple[str, list[str]]] = []
    clean_row = []
    for label, attack in columns:
        values = [r.get("sp_rank_clean") for r in data[label]["results"]
                  if r["attack"] == attack and r.get("sp_rank_clean") is not None]
        clean_row.append(_fmt(max(values)) if values else "–")
    rows.append(("0", clean_row))
    for eps in (e for e in epsilons if e != 0):
        cells = []
        for label, attack in columns:
            values = [r["sp_rank"] for r in data[label]["results"]
                      if r["attack"] == attack and r["eps"] == eps and r.get("sp_rank") is not None]
            cells.append(_fmt(max(values)) if values else "–")
        rows.append((_fmt_eps(eps), cells))
    lines += [f"| {eps} | " + " | ".join(cells) + " |" for eps, cells in rows]
    return lines


def _other_tables(blocks: Blocks) -> dict[str, list[str]]:
    """One small table per non-rank metric (ES "shift", ...): rows eps, columns attack (x block)."""
    metrics = [m for m in dict.fromkeys(r["metric"] for _, d in blocks for r in d["results"]) if m != "rank"]
    tables: dict[str, list[str]] = {}
    for metric in metrics:
        columns = _columns(blocks, metric)
        heads = []
        for label, _ in blocks:
            for attack, size_key, size in columns:
                name = attack + (f" {size_key}={size}" if size_key else "")
                heads.append(name if label is None else f"{label}: {name}")
        lines = ["| ε | " + " | ".join(heads) + " |", "| --- |" + " ---: |" * len(heads)]
        for eps in _epsilons(blocks, {metric}):
            cells = []
            for _, d in blocks:
                for attack, _, size in columns:
                    r = _lookup(d, attack, size, eps, metric)
                    cells.append(("invalid" if r.get("invalid") else f"{_fmt(r['mean'], 3)} ± {_fmt(r['std'], 3)}")
                                 if r else "–")
            lines.append(f"| {_fmt_eps(eps)} | " + " | ".join(cells) + " |")
        tables[metric] = lines
    return tables
