"""Train, validate or test a ranker: ``python train.py {fit,validate,test} --config configs/<x>.yaml``.

A thin LightningCLI: the model is any :class:`lightning_modules.Ranker` and the data any
:class:`data.RetrievalDataModule`, both chosen by ``class_path`` in the YAML configs. After
``fit`` it prints the clean retrieval metrics of the best checkpoint and where the
checkpoints and TensorBoard logs are.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from jsonargparse import ArgumentParser
from pytorch_lightning.cli import LightningCLI

import callbacks  # noqa: F401  (registers the project's callbacks for short class names)
from data import RetrievalDataModule
from lightning_modules import Ranker

TRAINER_DEFAULTS: dict[str, Any] = {
    # Our data modules shard training batches themselves (class-balanced per rank) and pad
    # evaluation splits with a DistributedSampler, so Lightning must not inject its own.
    "use_distributed_sampler": False,
    "default_root_dir": "runs",
}


class RankerCLI(LightningCLI):
    """LightningCLI with one-line errors and a summary after ``fit``."""

    def init_parser(self, **kwargs: Any) -> ArgumentParser:
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def setup_parser(self, add_subcommands: bool, main_kw: dict, subparser_kw: dict) -> None:
        # Sub-command parsers must not exit either, so main() can print a one-line error.
        main_kw.setdefault("exit_on_error", False)
        subparser_kw.setdefault("exit_on_error", False)
        super().setup_parser(add_subcommands, main_kw, subparser_kw)

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
    if bad_class:
        key, path, reason = bad_class.groups()
        base = {"model": Ranker, "data": RetrievalDataModule}.get(key)
        known = ", ".join(sorted(_subclass_names(base))) if base is not None else ""
        message = f"unknown {key} class '{path}' ({reason.strip()})" + (f"; known: {known}" if known else "")
    return message


def _subclass_names(base: type) -> set[str]:
    names: set[str] = set()
    for sub in base.__subclasses__():
        names.add(f"{sub.__module__.split('.')[0]}.{sub.__name__}")
        names |= _subclass_names(sub)
    return names


def main(args: list[str] | None = None) -> RankerCLI:
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
        )
    except FileNotFoundError as err:  # missing data / checkpoint: the message says what to do
        print(f"train.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:  # argument / config errors: one clear line, no traceback
        if type(err).__name__ not in {"ArgumentError", "NSKeyError"}:
            raise
        print(f"train.py: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
