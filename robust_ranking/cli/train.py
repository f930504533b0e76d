"""Train, validate or test a ranker: ``python train.py {fit,validate,test} --config configs/<x>.yaml``.

A thin LightningCLI: the model is any :class:`lightning_modules.Ranker` and the data any
:class:`data.RetrievalDataModule`, both chosen by ``class_path`` in the YAML configs. After
``fit`` it prints the clean retrieval metrics of the best checkpoint and where the
checkpoints and TensorBoard logs are.

Bad input is refused before any work starts (no run directory is created) with one line on
stderr, ``train.py: error: <message>``, and exit status 2: unknown arguments and classes, invalid
data-module settings, data files that are missing, truncated or corrupt, a training batch the
training split cannot fill, a learning rate that is not a finite number > 0, and a training batch
that cannot fit in the available memory (:func:`training_batch_bytes`). Lightning's start-up
messages are held back until the checks pass, so a refused run prints nothing else on stderr.
There is no ``predict`` sub-command (``eval.py`` embeds and evaluates trained rankers).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch
from jsonargparse import ArgumentParser
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.cli import LightningCLI

import robust_ranking.callbacks  # noqa: F401  (registers the project's callbacks for short class names)
from robust_ranking import CONFIGS
from robust_ranking.data import DataConfigError, RetrievalDataModule
from robust_ranking.lightning_modules import Ranker
from robust_ranking.lightning_modules.checkpoint_io import upgrade_class_paths

TRAINER_DEFAULTS: dict[str, Any] = {
    # Our data modules shard training batches themselves (class-balanced per rank) and pad
    # evaluation splits with a DistributedSampler, so Lightning must not inject its own.
    "use_distributed_sampler": False,
    "default_root_dir": "runs",
}

#: Lower bounds on what one training step keeps in memory, used only to refuse batch sizes that
#: cannot fit (:func:`training_batch_bytes`). Per value of the input batch, the backbone keeps at
#: least this many activation values for the backward pass: the first convolution alone keeps 32
#: (C2F1: 32 full-resolution maps), about 15 (LeNet: 20 maps of 24x24 per 28x28 input) or 64
#: (ResNet-18, small-image stem) values per grey-scale input value.
ACTIVATIONS_PER_INPUT_VALUE = 8
#: Number of ``batch_size x batch_size`` matrices the pairwise ranking losses hold (distances,
#: label masks, their gradients): measured 8 (contrastive) and 9 (DCH) on CPU; the all-triplets
#: margin loss even grows as ``batch_size ** 3``.
PAIR_MATRICES = 4


class ConfigError(ValueError):
    """A setting ``train.py`` refuses before any work starts; printed as one line, exit status 2."""


def training_batch_bytes(batch_size: int, image_shape: tuple[int, ...], bytes_per_value: int = 4) -> int:
    """A lower bound on the memory one training step of ``batch_size`` images needs.

    ``batch_size * prod(image_shape) * (1 + ACTIVATIONS_PER_INPUT_VALUE)`` values for the input
    batch and the backbone's activations, plus ``PAIR_MATRICES * batch_size ** 2`` values for the
    pairwise loss, each ``bytes_per_value`` bytes. Deliberately an underestimate (model weights,
    optimizer state and the rest of the network are left out): a batch is refused only when even
    this cannot fit.
    """
    image_values = math.prod(image_shape)
    values = batch_size * image_values * (1 + ACTIVATIONS_PER_INPUT_VALUE) + PAIR_MATRICES * batch_size**2
    return values * bytes_per_value


def _largest_batch_that_fits(available: int, image_shape: tuple[int, ...], bytes_per_value: int) -> int:
    """The largest ``B`` with ``training_batch_bytes(B) <= available`` (solving the quadratic)."""
    a = PAIR_MATRICES * bytes_per_value
    b = math.prod(image_shape) * (1 + ACTIVATIONS_PER_INPUT_VALUE) * bytes_per_value
    return max(0, int((-b + math.sqrt(b * b + 4 * a * max(available, 0))) / (2 * a)))


def _host_available_bytes() -> int | None:
    """Memory this process can still get: the kernel's MemAvailable (free + reclaimable cache; free
    pages from ``os.sysconf`` where there is no /proc), capped by a cgroup v2 memory limit."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            return None
    try:  # containers: the OOM killer fires at the cgroup's limit, not the machine's
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                available = min(available, int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        pass
    return available


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


class _StartupOutput:
    """Holds Lightning's start-up log lines and warnings until the run really starts.

    A run refused by the checks then prints only its one error line; a run that starts (or fails
    with a genuine bug) gets them all replayed first.
    """

    LOGGERS = ("pytorch_lightning", "lightning_fabric")

    def __init__(self) -> None:
        self._records: list[logging.LogRecord] = []
        self._warnings: list[tuple[Any, ...]] = []
        self._saved: dict[str, tuple[list[logging.Handler], bool]] | None = None
        self._showwarning: Any = None

    def hold(self) -> None:
        records, held = self._records, self._warnings

        class _Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record)

        handler = _Keep()
        self._saved = {}
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self._saved[name] = (logger.handlers[:], logger.propagate)
            logger.handlers, logger.propagate = [handler], False
        self._showwarning = warnings.showwarning
        warnings.showwarning = lambda *args, **kwargs: held.append((args, kwargs))

    def release(self, replay: bool = True) -> None:
        """Restore the loggers and warnings; print what was held unless ``replay`` is False."""
        if self._saved is None:
            return
        for name, (handlers, propagate) in self._saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
        warnings.showwarning = self._showwarning
        self._saved = None
        if replay:
            for record in self._records:
                logging.getLogger(record.name).handle(record)
            for args, kwargs in self._warnings:
                warnings.showwarning(*args, **kwargs)
        self._records.clear()
        self._warnings.clear()


def _innermost_message(err: BaseException) -> str:
    """The message of the innermost ValueError / MisconfigurationException behind ``err`` (jsonargparse
    wraps what a class's ``__init__`` raises in its own union error), on one line."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for inner in reversed(chain):
        if isinstance(inner, (ValueError, MisconfigurationException)):
            return " ".join(str(inner).split())
    return " ".join(str(err).split())


def _learning_rate_error(value: object) -> ConfigError:
    return ConfigError(
        f"invalid learning rate {value}: it must be a finite number > 0; set "
        "--model.init_args.optimizer.init_args.lr (optimizer.init_args.lr in the config)"
    )


class RankerCLI(LightningCLI):
    """LightningCLI with one-line errors, checks before any work starts and a summary after ``fit``.

    ``fit``, ``validate`` and ``test``; ``predict`` is not offered (rankers have no prediction
    step: ``eval.py`` embeds and evaluates them).
    """

    def __init__(self, *args: Any, startup_output: _StartupOutput | None = None, **kwargs: Any) -> None:
        self._startup_output = startup_output
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = dict(LightningCLI.subcommands())
        commands.pop("predict", None)
        return commands

    def init_parser(self, **kwargs: Any) -> ArgumentParser:
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def setup_parser(self, add_subcommands: bool, main_kw: dict, subparser_kw: dict) -> None:
        # Sub-command parsers must not exit either, so main() can print a one-line error.
        main_kw.setdefault("exit_on_error", False)
        subparser_kw.setdefault("exit_on_error", False)
        super().setup_parser(add_subcommands, main_kw, subparser_kw)

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path``: check the file before Lightning reads it, and make Lightning read it with
        ``weights_only=True``. Lightning takes the model config recorded in the checkpoint (importing
        the classes it names) and later restores the run from the file; a checkpoint that would need
        to run code, or names classes outside the project's allow-lists, is refused first, as an
        argument error (one line, exit status 2)."""
        from pathlib import Path

        from jsonargparse import ArgumentError

        from robust_ranking.lightning_modules.checkpoint_io import check_hyperparameters, load_checkpoint, ranker_class

        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            try:
                hparams = load_checkpoint(ckpt_path).get("hyper_parameters")
                if isinstance(hparams, dict):
                    check_hyperparameters(hparams, str(ckpt_path))
                    if "_class_path" in hparams:
                        ranker_class(hparams["_class_path"], str(ckpt_path))
            except ValueError as err:
                raise ArgumentError(None, f"--ckpt_path {err}") from None
            if "weights_only" in self.config[subcommand]:
                self.config[subcommand]["weights_only"] = True
        super()._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a ValueError on the way is a setting error (one line)."""
        try:
            super().instantiate_classes()
        except (ValueError, MisconfigurationException) as err:
            raise ConfigError(_innermost_message(err)) from err

    # ------------------------------------------------------------ checks before any work starts
    def before_fit(self) -> None:
        self._check_optimizer()
        self._prepare_data("fit")
        self._start()

    def before_validate(self) -> None:
        self._prepare_data("validate")
        self._start()

    def before_test(self) -> None:
        self._prepare_data("test")
        self._start()

    def _start(self) -> None:
        """The checks passed: print Lightning's held start-up messages and let the run begin."""
        if self._startup_output is not None:
            self._startup_output.release()

    def _check_optimizer(self) -> None:
        """Build the optimizer on a dummy parameter: torch's own argument errors, and a learning
        rate that is not a finite number > 0 (torch accepts 0 and inf), are refused here rather
        than inside ``fit``."""
        factory = getattr(self.model, "optimizer_factory", None)
        if factory is None:
            return
        try:
            optimizer = factory([torch.nn.Parameter(torch.zeros(1))])
        except ValueError as err:
            message = _innermost_message(err)
            bad_lr = re.match(r"Invalid learning rate: (\S+)", message)
            if bad_lr:
                raise _learning_rate_error(bad_lr.group(1)) from err
            raise ConfigError(
                f"invalid optimizer setting ({message}): fix --model.init_args.optimizer.init_args"
            ) from err
        for group in getattr(optimizer, "param_groups", []):
            if "lr" in group and not (math.isfinite(float(group["lr"])) and float(group["lr"]) > 0):
                raise _learning_rate_error(float(group["lr"]))

    def _prepare_data(self, stage: str) -> None:
        """Load the data before the trainer starts (so missing, truncated or corrupt files and batches
        the training split cannot fill are reported before a run directory exists), and for ``fit``
        refuse a training batch that cannot fit in memory.

        Only local rank 0 loads here; other processes load inside the trainer as usual (after rank 0
        has downloaded what was missing)."""
        datamodule = self.datamodule
        if not isinstance(datamodule, RetrievalDataModule):
            return
        shape_known = datamodule.image_shape is not None
        if stage == "fit" and shape_known:
            self._check_batch_memory()
        if self.trainer.local_rank == 0:
            datamodule.prepare_data()
            datamodule.setup(stage)
            if stage == "fit":
                datamodule.check_training_batches(num_replicas=self.trainer.world_size)
        if stage == "fit" and not shape_known and datamodule.image_shape is not None:
            self._check_batch_memory()

    def _available_memory(self) -> tuple[int, str] | None:
        """``(bytes, what)`` free where the training batches live, or None when unknown."""
        device = self.trainer.strategy.root_device
        if device.type == "cuda":
            launcher = getattr(self.trainer.strategy, "launcher", None)
            if getattr(launcher, "_start_method", None) == "fork":
                return None  # CUDA must stay uninitialised in a process that forks its workers
            try:
                free, _total = torch.cuda.mem_get_info(device)
            except RuntimeError:
                return None
            return int(free), f"memory is free on {device}"
        if device.type == "cpu":
            available = _host_available_bytes()
            if available is None:
                return None
            processes = max(1, int(self.trainer.num_devices))  # CPU DDP: every process on this host
            what = "host memory is available" + (f" to each of {processes} processes" if processes > 1 else "")
            return available // processes, what
        return None

    def _check_batch_memory(self) -> None:
        """Refuse a training batch whose lower-bound footprint exceeds the available memory."""
        datamodule = self.datamodule
        precision = str(self.trainer.precision)
        bytes_per_value = 8 if "64" in precision else 2 if "16" in precision else 4
        batch_size, shape = datamodule.batch_size, tuple(datamodule.image_shape)
        needed = training_batch_bytes(batch_size, shape, bytes_per_value)
        available = self._available_memory()
        if available is None or needed <= available[0]:
            return
        free, what = available
        fits = _largest_batch_that_fits(free, shape, bytes_per_value)
        fits -= fits % datamodule.samples_per_class
        pairs = PAIR_MATRICES * batch_size**2 * bytes_per_value
        raise ConfigError(
            f"a training batch of batch_size {batch_size} ({'x'.join(map(str, shape))} images) needs at least "
            f"{_gib(needed)} ({_gib(needed - pairs)} for images and activations, {_gib(pairs)} for the loss's "
            f"{batch_size} x {batch_size} pair matrices) but only {_gib(free)} of {what}; lower "
            f"--data.init_args.batch_size" + (f" (even this lower bound rules out more than about {fits})" if fits > 0 else "")
        )

    # ------------------------------------------------------------ after the run
    def after_fit(self) -> None:
        self._print_summary("val")

    def after_validate(self) -> None:
        self._print_summary("val")

    def after_test(self) -> None:
        self._print_summary("test")

    def _print_summary(self, stage: str) -> None:
        """Clean metrics, best checkpoint and log location, printed once (rank 0)."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        print()
        print("=" * 72)
        ckpt = trainer.checkpoint_callback
        if self.subcommand == "fit" and ckpt is not None and ckpt.best_model_path:
            score = f"  ({ckpt.monitor} = {float(ckpt.best_model_score):.4f})" if ckpt.best_model_score is not None else ""
            print(f"best checkpoint: {ckpt.best_model_path}{score}")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{stage}/")}
        if metrics:
            print(f"clean retrieval metrics ({stage}):")
            for key in sorted(metrics):
                print(f"  {key:<16} {metrics[key]:.6f}")
        if trainer.logger is not None and trainer.logger.log_dir:
            print(f"TensorBoard logs: {trainer.logger.log_dir}")
            print(f"  view them with: tensorboard --logdir {trainer.logger.save_dir}")
        print("=" * 72)


def _one_line(err: BaseException) -> str:
    """A short message for argument errors; jsonargparse's union errors are very long."""
    message = " ".join(str(err).split())
    bad_class = re.search(r'Parser key "(\w+)".*?Problem with given class_path \'([^\']+)\': ([^-]+?)(?: - |$)', message)
    if bad_class and bad_class.group(3).startswith("Parser key"):
        # the class exists but one of its (nested) arguments has a value of the wrong type
        key, path, _ = bad_class.groups()
        nested = re.search(r"NestedArg\(key='([^']+)', val='([^']*)'\)", message)
        where = f"{key}.init_args.{nested.group(1)} = {nested.group(2)!r}" if nested else key
        expected = sorted(set(re.findall(r"Expected a <class '(\w+)'>", message)) - {"NoneType"})
        message = f"invalid value for {where} ({path})" + (f": expected {' or '.join(expected)}" if expected else "")
    elif bad_class:
        key, path, reason = bad_class.groups()
        base = {"model": Ranker, "data": RetrievalDataModule}.get(key)
        known = ", ".join(sorted(_subclass_names(base))) if base is not None else ""
        message = f"unknown {key} class '{path}' ({reason.strip()})" + (f"; known: {known}" if known else "")
        if upgrade_class_paths(path) != path:  # a class path of a release before 0.2
            message = (f"unknown {key} class '{path}': the classes moved into the robust_ranking package, "
                       f"write '{upgrade_class_paths(path)}'")
    return message


def _subclass_names(base: type) -> set[str]:
    names: set[str] = set()
    for sub in base.__subclasses__():
        package = ".".join(sub.__module__.split(".")[:2])  # the exporting package, e.g. robust_ranking.data
        names.add(f"{package}.{sub.__name__}")
        names |= _subclass_names(sub)
    return names


def _refuse(message: str) -> NoReturn:
    print(f"train.py: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2) from None


def shipped_config_args(args: list[str]) -> list[str]:
    """``args`` with each ``--config X`` that names no file but a shipped config (``configs/x.yaml``
    or ``x.yaml``, looked up in :data:`robust_ranking.CONFIGS`) replaced by that file's path, so that
    the README's commands work from an installed package too. A file that exists always wins."""
    out = list(args)
    for i, arg in enumerate(out):
        value, prefix = (out[i + 1], None) if arg == "--config" and i + 1 < len(out) else (
            (arg.split("=", 1)[1], "--config=") if arg.startswith("--config=") else (None, None))
        if value is None or Path(value).exists():
            continue
        shipped = CONFIGS / Path(value.removeprefix("configs/"))
        if shipped.is_file():
            if prefix:
                out[i] = prefix + str(shipped)
            else:
                out[i + 1] = str(shipped)
    return out


def main(args: list[str] | None = None) -> RankerCLI:
    """Run the CLI; bad input ends with one ``train.py: error: ...`` line on stderr and exit status 2.

    Only the project's own errors (:class:`ConfigError`, :class:`data.DataConfigError`, missing
    files) and jsonargparse's argument errors are shortened; anything else is a bug and keeps its
    traceback.
    """
    given = sys.argv[1:] if args is None else args
    if shipped_config_args(given) != given:  # only then: LightningCLI warns about an explicit args list
        args = shipped_config_args(given)
    startup = _StartupOutput()
    startup.hold()
    refused = False
    try:
        return RankerCLI(
            Ranker,
            RetrievalDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            args=args,
            startup_output=startup,
        )
    except FileNotFoundError as err:  # missing data / checkpoint: the message says what to do
        refused = True
        _refuse(str(err))
    except (ConfigError, DataConfigError) as err:  # settings and data files we refuse
        refused = True
        _refuse(str(err))
    except Exception as err:  # argument / config errors: one clear line, no traceback
        if type(err).__name__ not in {"ArgumentError", "NSKeyError"}:
            raise
        refused = True
        _refuse(_one_line(err))
    finally:
        startup.release(replay=not refused)


if __name__ == "__main__":
    main()
