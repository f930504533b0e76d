"""Loading checkpoints without running code from them.

A pickle can name any importable callable and have it called while it loads (a ``__reduce__``
payload), and a checkpoint's recorded model config names classes that get imported; so every
checkpoint and tensor file the project reads goes through this module:

- :func:`load_checkpoint` -- ``torch.load(..., weights_only=True)``: tensors and plain Python
  values only. Besides those, only the optimizer classes of ``torch.optim`` are accepted (as
  class references: a ranker built in Python records its ``optimizer`` default, e.g.
  ``torch.optim.Adam``, in its hyper-parameters). Anything else -- a payload, a truncated file, a
  file that is not a checkpoint -- is one :class:`UnsafeCheckpointError` with a one-line message.
- :func:`ranker_class` -- the ranker class a checkpoint names, checked against a fixed allow-list
  of the project's own modules *before* anything is imported.
- :func:`check_hyperparameters` -- the same for the nested ``class_path`` entries (backbone,
  loss, optimizer ...) and dotted import paths of a recorded model config, which jsonargparse
  would import while rebuilding the model.
- :func:`ranker_from_checkpoint` -- the ranker rebuilt from an already loaded checkpoint dict
  (Lightning's ``load_from_checkpoint`` would read the file a second time).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "COMPONENT_MODULES",
    "RANKER_MODULES",
    "UnsafeCheckpointError",
    "check_hyperparameters",
    "load_checkpoint",
    "ranker_class",
    "upgrade_class_paths",
    "ranker_from_checkpoint",
]

#: Modules whose classes a checkpoint may name as its model (``hyper_parameters["_class_path"]``).
RANKER_MODULES = ("robust_ranking.lightning_modules",)
#: Modules whose classes and functions a checkpoint's recorded model config may name (backbone,
#: loss, distance, miner, optimizer, learning-rate schedule ...).
COMPONENT_MODULES = ("robust_ranking.lightning_modules", "pytorch_metric_learning", "torch.nn", "torch.optim")
#: The instantiators LightningCLI records (``hyper_parameters["_instantiator"]``).
_INSTANTIATORS = ("pytorch_lightning.cli.instantiate_module", "lightning.pytorch.cli.instantiate_module")

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED_PATH = re.compile(rf"{_IDENTIFIER}(?:\.{_IDENTIFIER})+")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


#: The top-level packages of releases before 0.2, which had no ``robust_ranking`` package around them.
_LEGACY_PACKAGES = ("attacks", "callbacks", "data", "evaluation", "lightning_modules", "retrieval")
_LEGACY_PATH = re.compile(rf"(?:{'|'.join(_LEGACY_PACKAGES)})(?:\.{_IDENTIFIER})+")


def upgrade_class_paths(value: Any) -> Any:
    """``value`` (a nest of dicts, lists and strings: a recorded model config, a run config) with
    the class paths of releases before 0.2 moved into the package: ``lightning_modules.LeNet`` ->
    ``robust_ranking.lightning_modules.LeNet``. Checkpoints and run configs written before the
    project became an installable package keep loading; the result is checked like any other."""
    if isinstance(value, str):
        return "robust_ranking." + value if _LEGACY_PATH.fullmatch(value) else value
    if isinstance(value, dict):
        return {k: upgrade_class_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [upgrade_class_paths(v) for v in value]
    if isinstance(value, tuple):
        return tuple(upgrade_class_paths(v) for v in value)
    return value


class UnsafeCheckpointError(ValueError):
    """A checkpoint refused before any of it runs: loading it would need to run code (a pickled
    object other than tensors and plain values, or a class outside the allow-lists), or the file is
    not a checkpoint at all (truncated, corrupt, another format). The message is one line and names
    the file."""


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _optimizer_classes() -> list[type]:
    """The optimizer classes ``torch.optim`` exports: class references a ranker built in Python
    keeps in its hyper-parameters. Calling one only builds an optimizer over given tensors."""
    base = torch.optim.Optimizer
    return [obj for obj in vars(torch.optim).values() if isinstance(obj, type) and issubclass(obj, base) and obj is not base]


def _refusal(path: str, err: BaseException) -> UnsafeCheckpointError:
    message = str(err)
    found = _UNSUPPORTED_GLOBAL.search(message)
    if found:
        return UnsafeCheckpointError(
            f"{path} is refused: loading it would need to run code (it references {found.group(1).rstrip('.')}, "
            "which is not a tensor or a plain value); only checkpoints of tensors and plain values are loaded")
    if "Weights only load failed" in message:  # another pickle operation the safe loader does not allow
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", message, re.S)
        reason = f": {_one_line(detail.group(1), 80)}" if detail else ""
        return UnsafeCheckpointError(f"{path} is not a checkpoint (not a file torch.save wrote{reason})")
    if isinstance(err, EOFError) or not message.strip():
        return UnsafeCheckpointError(f"{path} is not a checkpoint (empty or truncated file)")
    first_sentence = _one_line(message).split(". ")[0]
    if isinstance(err, RuntimeError) and "PytorchStreamReader" not in message:  # e.g. map_location to a missing device
        return UnsafeCheckpointError(f"{path} cannot be loaded ({first_sentence})")
    return UnsafeCheckpointError(f"{path} is not a checkpoint (truncated or corrupt: {first_sentence})")


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The dict saved in ``path`` (a Lightning checkpoint, a state dict or a dict of tensors),
    loaded with ``torch.load(weights_only=True)`` so that nothing in the file can run code.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file would need to run code to load, is truncated or corrupt,
            is not a ``torch.save`` file, or does not hold a dict.
    """
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_optimizer_classes()):
            loaded = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except OSError as err:
        raise UnsafeCheckpointError(f"{path} cannot be read ({_one_line(err)})") from None
    except Exception as err:  # noqa: BLE001 - unpickling raises many types; all mean "refused"
        raise _refusal(path, err) from None
    if not isinstance(loaded, dict):
        raise UnsafeCheckpointError(f"{path} is not a checkpoint (it holds a {type(loaded).__name__}, not a dict)")
    return loaded


def _under(dotted: str, modules: tuple[str, ...]) -> bool:
    return any(dotted.startswith(module + ".") for module in modules)


def ranker_class(class_path: Any, source: str) -> type:
    """The :class:`lightning_modules.Ranker` subclass named by a checkpoint's ``class_path``.

    The string is checked (identifiers separated by dots, under :data:`RANKER_MODULES`) before
    anything is imported; only then is its module imported and the class checked.

    Raises:
        UnsafeCheckpointError: the class path is malformed or outside :data:`RANKER_MODULES`.
        ValueError: no such class, or it is not a ``Ranker`` subclass.
    """
    from robust_ranking.lightning_modules.ranker import Ranker

    if not isinstance(class_path, str) or not _DOTTED_PATH.fullmatch(class_path):
        raise UnsafeCheckpointError(f"{source}: the model class path {str(class_path)[:80]!r} is refused "
                                    "(not a dotted class name); not a robust_ranking.lightning_modules.Ranker")
    if not _under(class_path, RANKER_MODULES):
        raise UnsafeCheckpointError(
            f"{source}: the model class {class_path!r} is refused: not a robust_ranking.lightning_modules.Ranker "
            f"(a checkpoint may only name classes of {', '.join(m + '.' for m in RANKER_MODULES)})")
    module_name, _, class_name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ValueError(f"{source} holds a {class_path}: there is no module {module_name}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"{source} holds a {class_path}: {module_name} has no {class_name}")
    if not (isinstance(cls, type) and issubclass(cls, Ranker)):
        raise ValueError(f"{source} holds a {class_path}, not a robust_ranking.lightning_modules.Ranker")
    return cls


def _strings(value: Any, key: Any = None) -> Iterator[tuple[Any, str]]:
    """``(key, string)`` for every string in a nest of dicts, lists and tuples (dict values)."""
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, k)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v, key)


def _importable_top_level(dotted: str) -> bool:
    """Whether the first name of ``dotted`` is an importable module (looked up, not imported)."""
    top = dotted.split(".", 1)[0]
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return True  # cannot tell: treat it as importable


def check_hyperparameters(hparams: dict[str, Any], source: str) -> None:
    """Refuse a recorded model config that names code outside the allow-lists.

    Rebuilding a model from its config (jsonargparse) imports every nested ``class_path`` and every
    dotted path given for a callable argument: each ``class_path`` with a dot must be under
    :data:`COMPONENT_MODULES`, and so must any other string that is a dotted path starting with an
    importable module. ``_instantiator`` must be LightningCLI's own.

    Raises:
        UnsafeCheckpointError: with the offending entry.
    """
    instantiator = hparams.get("_instantiator")
    if instantiator is not None and instantiator not in _INSTANTIATORS:
        raise UnsafeCheckpointError(f"{source}: the instantiator {str(instantiator)[:80]!r} is refused "
                                    f"(only {_INSTANTIATORS[0]})")
    for key, value in _strings({k: v for k, v in hparams.items() if k not in ("_class_path", "_instantiator")}):
        if key == "class_path":
            if re.fullmatch(_IDENTIFIER, value):
                continue  # a short class name: resolved among already imported subclasses
            if not _DOTTED_PATH.fullmatch(value):
                raise UnsafeCheckpointError(f"{source}: the class path {value[:80]!r} in the model config is "
                                            "refused (not a dotted class name)")
        elif not (_DOTTED_PATH.fullmatch(value) and _importable_top_level(value)):
            continue  # not something jsonargparse could import
        if not _under(value, COMPONENT_MODULES):
            raise UnsafeCheckpointError(
                f"{source}: {value[:80]!r} in the model config is refused: it names code outside the allow-list "
                f"(a checkpoint may only name classes and functions of {', '.join(m + '.' for m in COMPONENT_MODULES)})")


def _without_pretrained_weights(value: Any) -> Any:
    """``value`` (a recorded model config) with every ``weights_path`` entry set to ``None``."""
    if isinstance(value, dict):
        return {k: (None if k == "weights_path" else _without_pretrained_weights(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_pretrained_weights(v) for v in value]
    return value


def ranker_from_checkpoint(checkpoint: dict[str, Any], source: str) -> Any:
    """The ranker of a checkpoint dict returned by :func:`load_checkpoint`, rebuilt from the model
    config LightningCLI recorded in it and its ``state_dict``, on the device its tensors were
    loaded to.

    Lightning's ``load_from_checkpoint`` minus reading the file: the class path and the config are
    checked (:func:`ranker_class`, :func:`check_hyperparameters`) and then Lightning's own
    ``_load_state`` builds the model and loads the state dict (strict unless the model says
    otherwise), as ``load_from_checkpoint`` does.

    Raises:
        UnsafeCheckpointError: the checkpoint names classes outside the allow-lists.
        ValueError: it records no model class (not trained through ``train.py``), or names no ranker.
    """
    from pytorch_lightning.core.saving import _load_state
    from pytorch_lightning.utilities.migration.utils import _pl_migrate_checkpoint

    hparams = checkpoint.get("hyper_parameters")
    class_path = hparams.get("_class_path") if isinstance(hparams, dict) else None
    if not class_path:
        raise ValueError(
            f"{source} records no model class_path (not trained through train.py?): "
            "build the model from its config and load the state_dict instead"
        )
    if "state_dict" not in checkpoint:
        raise ValueError(f"{source} holds no state_dict")
    hparams = upgrade_class_paths(hparams)
    class_path = hparams["_class_path"]
    check_hyperparameters(hparams, source)
    cls = ranker_class(class_path, source)
    if "pytorch-lightning_version" in checkpoint:
        checkpoint = _pl_migrate_checkpoint(checkpoint)
    # The checkpoint's state_dict replaces any pretrained start: do not read the weights file again
    # (it may not exist where the checkpoint is evaluated).
    hparams = _without_pretrained_weights(hparams)
    model = _load_state(cls, {**checkpoint, "hyper_parameters": hparams})
    state_dict = checkpoint["state_dict"]
    device = next((t for t in state_dict.values() if isinstance(t, torch.Tensor)), torch.tensor(0)).device
    return model.to(device)
