"""Checkpoints and run configs: which ranker and which data a checkpoint belongs to.

A checkpoint written by ``train.py`` records its model config; the data module comes from the
run's ``config.yaml`` (LightningCLI saves it at ``<run>/config.yaml`` next to ``<run>/checkpoints/``)
or from an explicit data config. Checkpoints are read with ``weights_only=True`` through
:func:`lightning_modules.load_checkpoint`: nothing in them can run code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

from robust_ranking.evaluation.errors import EvaluationError, one_line
from robust_ranking.lightning_modules.checkpoint_io import upgrade_class_paths

__all__ = ["Section", "instantiate", "load_ranker", "read_yaml", "run_config", "run_dir", "run_fingerprint"]

Section = dict[str, Any]


def run_dir(ckpt: Path) -> Path:
    """``<run>`` of ``<run>/checkpoints/x.ckpt`` (LightningCLI layout), else the checkpoint's folder."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    """A YAML mapping from ``path`` (``what`` names it in errors)."""
    try:
        data = upgrade_class_paths(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError) as err:
        raise EvaluationError(f"cannot read {what} {path}: {one_line(err)}") from None
    if not isinstance(data, dict):
        raise EvaluationError(f"{what} {path} must be a YAML mapping")
    return data


def run_config(ckpt: Path, data_config: Path | None) -> tuple[Section | None, Section | None, str]:
    """``(model section or None, data section or None, where the sections came from)``."""
    run_config_path = run_dir(ckpt) / "config.yaml"
    run_config = read_yaml(run_config_path, "run config") if run_config_path.is_file() else None
    model_section = run_config.get("model") if run_config else None
    if data_config is not None:
        cfg = read_yaml(data_config, "data config")
        if "data" in cfg:
            model_section = cfg.get("model") or model_section
            cfg = cfg["data"]
        if not isinstance(cfg, dict) or "class_path" not in cfg:
            raise EvaluationError(
                f"data config {data_config} needs a 'data' section or a class_path + init_args mapping")
        return model_section, cfg, str(data_config)
    data_section = run_config.get("data") if run_config else None
    return model_section, data_section if isinstance(data_section, dict) else None, str(run_config_path)


def instantiate(section: dict[str, Any], base: type, key: str, where: str) -> Any:
    """Build a ``class_path`` + ``init_args`` section (a subclass of ``base``) with jsonargparse."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, key, fail_untyped=False)
    try:
        cfg = parser.parse_object({key: section})
        return getattr(parser.instantiate(cfg), key)
    except Exception as err:  # jsonargparse raises several types; all mean "bad section"
        raise EvaluationError(f"{where}: cannot build the {key} ({one_line(err)[:300]})") from None


def load_ranker(ckpt: Path, model_section: dict[str, Any] | None, where: str) -> Any:
    """The :class:`lightning_modules.Ranker` stored in ``ckpt`` (on the CPU).

    :func:`lightning_modules.load_ranker` first (the model config recorded in the checkpoint
    by ``train.py``); if the checkpoint's hyper-parameters cannot rebuild the model (e.g. a
    checkpoint written before they recorded the backbone), the run config's ``model`` section
    is instantiated and the checkpoint's state dict loaded into it (strictly). The file is read
    once, with ``lightning_modules.load_checkpoint`` (nothing in it can run code); a checkpoint that
    needs code to load, or names classes outside the project's allow-lists, is refused.
    """
    from robust_ranking.lightning_modules import Ranker, UnsafeCheckpointError, load_checkpoint, ranker_from_checkpoint

    checkpoint: dict[str, Any] = {}
    try:
        checkpoint = load_checkpoint(ckpt, map_location="cpu")
        model = ranker_from_checkpoint(checkpoint, str(ckpt))
    except (UnsafeCheckpointError, FileNotFoundError) as err:  # refused: no fallback
        raise EvaluationError(one_line(err)) from None
    except Exception as first:  # noqa: BLE001 - any other failure falls back to the run config
        if "state_dict" not in checkpoint:
            raise EvaluationError(f"{ckpt} is not a Lightning checkpoint of a Ranker (no state_dict)") from None
        if model_section is None:
            raise EvaluationError(f"cannot load a Ranker from {ckpt} ({one_line(first)[:120]}...) and there is no "
                            "run config.yaml with a 'model' section next to it; "
                            "pass --data-config <run>/config.yaml") from None
        model = instantiate(model_section, Ranker, "model", where)
        try:
            model.load_state_dict(checkpoint["state_dict"], strict=True)
        except RuntimeError as err:
            raise EvaluationError(f"{ckpt} does not match the model of {where} ({one_line(err)[:200]})") from None
    if not isinstance(model, Ranker) or type(model) is Ranker:  # a bare Ranker has no embed()
        raise EvaluationError(f"{ckpt} does not hold a ranker model (got {type(model).__name__}); "
                        "expected a checkpoint of a robust_ranking.lightning_modules.Ranker subclass")
    return model


def run_fingerprint(ckpt: Path, suite: Any, data_section: Any) -> dict[str, Any]:
    """What identifies an evaluation: the checkpoint's bytes (sha256), the exact suite, the data config."""
    digest = hashlib.sha256()
    with ckpt.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"checkpoint_sha256": digest.hexdigest(), "suite": suite.to_dict(), "data": data_section}
