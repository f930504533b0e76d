"""Bad input to the command-line programs: one ``<prog>: error: <message>`` line on stderr, exit
status 2, no traceback, and nothing written before the refusal.

:data:`CASES` is one table of rows; each runs ``python <prog> <argv>`` in a subprocess from the
repository root (all rows once per session, two at a time, by the ``outcomes`` fixture). ``{tmp}`` in ``argv`` stands for the row's temporary directory; ``prepare``
(optional) fabricates files there first. Rows for other programs (``eval.py``) can be appended
with their own ``prog``.
"""

from __future__ import annotations

import fnmatch
import gzip
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from robust_ranking.cli import train
from robust_ranking.data import DataConfigError, SyntheticDataModule, write_idx_ubyte
from run_helpers import REPO, resolved_config

CT = "configs/fashion_mnist_ct.yaml"


@dataclass(frozen=True)
class Case:
    """One row: ``prog argv`` must fail with ``expected`` in its one error line and ``returncode``."""

    name: str
    prog: str
    argv: tuple[str, ...]
    expected: str
    returncode: int = 2
    prepare: Callable[[Path], None] | None = None
    #: what the program must leave behind under ``{tmp}`` (relative paths); by default nothing new
    writes: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- fabricated data
def _idx_tree(root: Path, n_train: int = 100, n_test: int = 50) -> Path:
    """A small, valid MNIST-format tree (gzipped IDX files) in ``root``."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx_ubyte(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx_ubyte(root / f"{split}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10)
    return root


def _bad_magic(tmp: Path) -> None:
    path = _idx_tree(tmp / "idx") / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x12\x34\x08\x03" + bytes(64)))


def _truncated_plain(tmp: Path) -> None:
    path = _idx_tree(tmp / "idx") / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.unlink()
    (path.parent / "train-images-idx3-ubyte").write_bytes(raw[:5000])  # the uncompressed file, cut short


def _truncated_gzip(tmp: Path) -> None:
    path = _idx_tree(tmp / "idx") / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-500])


def _corrupt_gzip(tmp: Path) -> None:
    path = _idx_tree(tmp / "idx") / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[12:30] = b"\xff" * 18  # garble the deflate stream
    path.write_bytes(bytes(raw))


def _yaml_with(tmp: Path, text: str) -> None:
    """``{tmp}/bad.yaml``: the CT config plus ``text`` (a misspelled key)."""
    (tmp / "bad.yaml").write_text(f"config: {REPO / CT}\n{text}")


# ----------------------------------------------------------------------------- the table
# train.py rows: a model config, CPU, every output redirected into the row's tmp directory.
TRAIN = ("fit", "--config", CT, "--trainer.accelerator", "cpu", "--trainer.default_root_dir", "{tmp}",
         "--trainer.logger.init_args.save_dir", "{tmp}/runs")
SYNTHETIC = (*TRAIN, "--data", "robust_ranking.data.SyntheticDataModule")  # 4 classes x 32 training images
SMALL = (*SYNTHETIC, "--data.batch_size", "16", "--data.samples_per_class", "4")
IDX = (*TRAIN, "--data.init_args.root", "{tmp}/idx", "--data.init_args.download", "false",
       "--data.init_args.batch_size", "20", "--data.init_args.samples_per_class", "2")

CASES: list[Case] = [
    # data-module arguments, refused in __init__
    Case("batch-not-multiple-of-samples-per-class", "train.py", (*TRAIN, "--data.init_args.batch_size", "100"),
         "batch_size (100) must be divisible by samples_per_class (16)"),
    Case("batch-size-zero", "train.py", (*TRAIN, "--data.init_args.batch_size", "0"),
         "batch_size must be a positive integer, got 0"),
    # what only the training split tells, refused in setup (before the trainer starts)
    Case("more-classes-per-batch-than-exist", "train.py", (*SYNTHETIC, "--data.batch_size", "128"),
         "a training batch needs 8 distinct classes"),
    Case("batch-larger-than-training-split", "train.py",
         (*SYNTHETIC, "--data.batch_size", "256", "--data.samples_per_class", "64"),
         "batch_size (256) is larger than the training split (128 samples)"),
    Case("samples-per-class-larger-than-every-class", "train.py",
         (*SYNTHETIC, "--data.batch_size", "128", "--data.samples_per_class", "64"),
         "samples_per_class (64) is larger than every class"),
    # corrupt or truncated IDX files: the message names the file and what is wrong
    Case("idx-bad-magic", "train.py", IDX, "train-images-idx3-ubyte.gz is not an IDX file (bad magic number",
         prepare=_bad_magic),
    Case("idx-truncated", "train.py", IDX,
         "train-images-idx3-ubyte: truncated IDX file: expected 78400 data bytes for shape (100, 28, 28), got 4984",
         prepare=_truncated_plain),
    Case("idx-truncated-gzip", "train.py", IDX, "train-images-idx3-ubyte.gz: truncated gzip file (expected 78416",
         prepare=_truncated_gzip),
    Case("idx-corrupt-gzip", "train.py", IDX, "t10k-labels-idx1-ubyte.gz: corrupt gzip file", prepare=_corrupt_gzip),
    # learning rates torch refuses only inside fit (or not at all: 0 and inf)
    Case("lr-negative", "train.py", (*SMALL, "--model.init_args.optimizer.init_args.lr", "-1"),
         "invalid learning rate -1.0: it must be a finite number > 0"),
    Case("lr-zero", "train.py", (*SMALL, "--model.init_args.optimizer.init_args.lr", "0"),
         "invalid learning rate 0.0"),
    Case("lr-nan", "train.py", (*SMALL, "--model.init_args.optimizer.init_args.lr", ".nan"),
         "invalid learning rate nan"),
    Case("lr-inf", "train.py", (*SMALL, "--model.init_args.optimizer.init_args.lr", ".inf"),
         "invalid learning rate inf"),
    # training batches that cannot fit in memory, refused before any data is loaded. 100000
    # Fashion-MNIST images need >= 151 GiB by the lower bound (on a machine with more free memory
    # the batch is still refused: it is larger than the 60000-image training split).
    Case("batch-100000-fashion-mnist", "train.py", (*TRAIN, "--data.init_args.batch_size", "100000"), "100000"),
    Case("batch-out-of-memory", "train.py",
         (*SYNTHETIC, "--data.batch_size", "4000000", "--data.samples_per_class", "1000000",
          "--data.init_args.image_shape", "[3, 224, 224]"),
         "a training batch of batch_size 4000000 (3x224x224 images) needs at least"),
    # no predict sub-command (rankers have no prediction step)
    Case("predict-subcommand", "train.py", ("predict", "--config", CT), "invalid choice: 'predict'"),
    # unknown classes, misspelled keys (on the command line and in a YAML), a missing data folder
    Case("unknown-data-class", "train.py", (*TRAIN, "--data", "robust_ranking.data.NoSuchDataModule"),
         "unknown data class 'robust_ranking.data.NoSuchDataModule'"),
    Case("unknown-model-class", "train.py", (*TRAIN, "--model", "robust_ranking.lightning_modules.NoSuchRanker"),
         "unknown model class 'robust_ranking.lightning_modules.NoSuchRanker'"),
    Case("model-class-before-0.2", "train.py", (*TRAIN, "--model", "lightning_modules.MetricRanker"),
         "the classes moved into the robust_ranking package, write 'robust_ranking.lightning_modules.MetricRanker'"),
    Case("unknown-trainer-key", "train.py", (*TRAIN, "--trainer.max_epocs", "3"),
         "unrecognized arguments: --trainer.max_epocs"),
    Case("unknown-model-key", "train.py", (*TRAIN, "--model.init_args.backbon", "x"), "backbon"),
    Case("unknown-key-in-yaml-nested", "train.py", ("fit", "--config", "{tmp}/bad.yaml"), "max_epoch",
         prepare=lambda tmp: _yaml_with(tmp, "trainer:\n  max_epoch: 3\n")),
    Case("unknown-key-in-yaml-dotted", "train.py", ("fit", "--config", "{tmp}/bad.yaml"), "max_epoch",
         prepare=lambda tmp: _yaml_with(tmp, "trainer.max_epoch: 3\n")),
    Case("missing-data-root", "train.py",
         (*TRAIN, "--data.root", "/no/such/dir", "--data.download", "false", "--trainer.fast_dev_run", "1"),
         "/no/such/dir does not exist"),
]


# ----------------------------------------------------------------------------- eval.py rows
# ``{run}`` is a tiny trained run (``<run>/config.yaml`` + ``<run>/model.ckpt``, see the ``tiny_run`` fixture).
EVAL = ("--suite", "configs/suites/quick.yaml", "--data-config", "{run}/config.yaml", "--accelerator", "cpu",
        "--no-progress")


class _Payload:
    """A pickle payload: unpickling it creates ``marker`` (it must never appear)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _payload_checkpoint(tmp: Path) -> None:
    import torch

    torch.save({"state_dict": {}, "hyper_parameters": {"x": _Payload(tmp / "PAYLOAD-RAN")}}, tmp / "payload.ckpt")


def _file(tmp: Path) -> None:
    (tmp / "a-file").write_text("")


def _bad_eps_suite(tmp: Path) -> None:
    (tmp / "bad.yaml").write_text("name: bad\nattacks: [{attack: CA+, epsilons: [3]}]\n")


def _stale_report(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "model.quick.json").write_text('{"meta": {"fingerprint": "of another checkpoint"}}')


def _nan_weights(tmp: Path) -> None:
    import torch

    checkpoint = torch.load(tmp / "model.ckpt", weights_only=True)
    state = checkpoint["state_dict"]
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    torch.save(checkpoint, tmp / "model.ckpt")


CASES += [
    Case("eval-payload-checkpoint", "eval.py", ("--ckpt", "{tmp}/payload.ckpt", *EVAL, "--output-dir", "{tmp}/out"),
         "payload.ckpt is refused: loading it would need to run code", prepare=_payload_checkpoint),
    Case("eval-missing-checkpoint", "eval.py", ("--ckpt", "{tmp}/missing.ckpt", *EVAL),
         "checkpoint {tmp}/missing.ckpt does not exist"),
    Case("eval-unknown-suite", "eval.py", ("--ckpt", "{tmp}/model.ckpt", *EVAL, "--suite", "{tmp}/nosuch.yaml"),
         "suite file '{tmp}/nosuch.yaml' does not exist"),
    Case("eval-unknown-suite-name", "eval.py", ("--ckpt", "{tmp}/model.ckpt", *EVAL, "--suite", "quik"),
         "unknown suite 'quik': give a suite file, or one of the shipped suites: "),
    Case("eval-eps-out-of-range", "eval.py", ("--ckpt", "{tmp}/model.ckpt", *EVAL, "--suite", "{tmp}/bad.yaml"),
         "epsilon 3 is outside [0, 1]", prepare=_bad_eps_suite),
    Case("eval-num-samples-0", "eval.py", ("--ckpt", "{tmp}/model.ckpt", *EVAL, "--num-samples", "0"),
         "num_samples must be an integer >= 1 or -1"),
    Case("eval-unwritable-output", "eval.py",
         ("--ckpt", "{tmp}/model.ckpt", *EVAL, "--output-dir", "{tmp}/a-file/reports"),
         "cannot write reports to {tmp}/a-file/reports ({tmp}/a-file is not a folder)", prepare=_file),
    Case("eval-suite-not-applicable", "eval.py",
         ("--ckpt", "{tmp}/model.ckpt", *EVAL, "--suite", "configs/suites/pqag_table.yaml", "--output-dir", "{tmp}"),
         "no attack of suite 'pqag_table' applies to"),
    Case("eval-report-of-another-run", "eval.py", ("--ckpt", "{tmp}/model.ckpt", *EVAL, "--output-dir", "{tmp}/out"),
         "model.quick.json is a finished report of another run", prepare=_stale_report),
    # a model that embeds NaN: the report is written (nothing lost) but has no score: exit 3
    Case("eval-nan-weights", "eval.py", ("--ckpt", "{tmp}/model.ckpt", *EVAL, "--output-dir", "{tmp}/out"),
         "no robustness score: ", returncode=3, prepare=_nan_weights,
         writes=("out", "out/model.quick.json", "out/model.quick.md", "out/tensorboard", "out/tensorboard/model.quick",
                 "out/tensorboard/model.quick/events.out.tfevents.*", "out/tensorboard/model.quick/hparams.yaml")),
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny ranker trained by ``train.py`` on synthetic data: ``<run>/config.yaml`` and ``<run>/model.ckpt``."""
    from run_helpers import train_in

    root = tmp_path_factory.mktemp("bad-input-run")
    train_in(root, ["fit", "--config", str(REPO / CT), "--data", "robust_ranking.data.SyntheticDataModule", "--data.batch_size", "16",
                    "--data.samples_per_class", "4", "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
                    "--trainer.logger.init_args.save_dir", str(root / "runs"),
                    "--trainer.logger.init_args.name", "tiny", "--trainer.enable_progress_bar", "false"])
    run = root / "runs" / "tiny" / "version_0"
    (ckpt,) = (run / "checkpoints").glob("epoch*.ckpt")
    shutil.copy(ckpt, run / "model.ckpt")
    return run


@dataclass
class Outcome:
    """A row's finished run: its temporary directory, the files there before the run, the process."""

    tmp: Path
    before: set[Path]
    proc: subprocess.CompletedProcess


def _run_case(case: Case, tmp: Path, run: Path | None) -> Outcome:
    if run is not None:
        shutil.copy(run / "model.ckpt", tmp / "model.ckpt")
    if case.prepare is not None:
        case.prepare(tmp)
    before = set(tmp.rglob("*"))
    argv = [arg.format(tmp=tmp, run=run) for arg in case.argv]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, case.prog, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    return Outcome(tmp, before, proc)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_run) -> dict[str, Outcome]:
    """Every row run once, two at a time (each is one interpreter start-up and a refusal: the start-up is most
    of the cost, and two cores start two interpreters in the time of one)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case.name: pool.submit(_run_case, case, tmp_path_factory.mktemp(case.name),
                                          tiny_run if case.prog == "eval.py" else None) for case in CASES}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_before_any_work(case: Case, outcomes: dict[str, Outcome]) -> None:
    tmp_path, before, proc = outcomes[case.name].tmp, outcomes[case.name].before, outcomes[case.name].proc
    assert proc.returncode == case.returncode, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"{case.prog}: error: "), lines[0]
    assert case.expected.format(tmp=tmp_path) in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "runs").exists(), "a refused run must not create a run directory"
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")} - {
        p.relative_to(tmp_path).as_posix() for p in before}
    # case.writes: what the run may write (glob patterns: event file names hold a time stamp), each once
    assert all(any(fnmatch.fnmatchcase(w, pattern) for pattern in case.writes) for w in written), " ".join(sorted(written))
    assert all(len(fnmatch.filter(written, pattern)) == 1 for pattern in case.writes), written


# ----------------------------------------------------------------------------- in-process checks
def test_replacement_is_used_only_when_asked_for() -> None:
    with pytest.raises(DataConfigError, match="sample_with_replacement"):
        dm = SyntheticDataModule(batch_size=256, samples_per_class=64)
        dm.setup("fit")
        dm.check_training_batches()
    dm = SyntheticDataModule(batch_size=256, samples_per_class=64, sample_with_replacement=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape[0] == 256 and len(set(batch.indices.tolist())) <= len(dm.train_set)


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_are_far_from_the_memory_limit(config: Path) -> None:
    """The memory check never refuses a shipped config: its lower bound stays under 64 MiB."""
    data = resolved_config("--config", str(config))["data"]  # a paper config is a stack of overlays
    batch_size = data.get("init_args", {}).get("batch_size", 64)
    image_shape = (3, 32, 32) if "cifar" in data["class_path"].lower() else (1, 28, 28)
    assert train.training_batch_bytes(batch_size, image_shape) < 64 * 2**20
