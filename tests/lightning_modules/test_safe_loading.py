"""No file the tools read can run code: pickled payloads, foreign class paths and tampered data
files are refused with one line, and the payload never runs.

The payload is harmless: unpickled by plain ``pickle`` it calls ``Path.touch(marker)``; every test
checks that the marker file never appears. Genuine checkpoints still load bit-identically.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import TripletMarginLoss

from robust_ranking.cli import eval as eval_script
from robust_ranking.cli import train
from robust_ranking.callbacks import WarmStart
from robust_ranking.data import CIFAR10DataModule, DataConfigError, SyntheticDataModule
from robust_ranking.evaluation.checkpoints import load_ranker as load_run_ranker
from robust_ranking.lightning_modules import LeNet, MetricRanker, UnsafeCheckpointError, load_checkpoint, load_ranker
from run_helpers import REPO, TINY_CONFIG, train_in



# Transferable attacks only (an ES entry would be refused before any checkpoint is read).
TRANSFER_SUITE = """
name: safe-loading
num_samples: 4
seed: 0
batch_size: 4
attacks:
  - {attack: CA+, epsilons: [0.1], w: [1], steps: 1}
"""

ZEN = "Beautiful is better than ugly"


class Payload:
    """Unpickled by plain ``pickle``, this calls ``Path.touch(marker)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """``train.py fit`` of a tiny ranker: its checkpoint, run config and YAML config."""
    root = tmp_path_factory.mktemp("safe_loading")
    (root / "tiny.yaml").write_text(TINY_CONFIG)
    (root / "suite.yaml").write_text(TRANSFER_SUITE)
    train_in(root, ["fit", "--config", str(root / "tiny.yaml")])
    run_dir = root / "runs" / "tiny" / "version_0"
    (ckpt,) = (run_dir / "checkpoints").glob("*.ckpt")
    return {"root": root, "ckpt": ckpt, "config": run_dir / "config.yaml", "yaml": root / "tiny.yaml",
            "suite": root / "suite.yaml"}


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PAYLOAD_RAN"
    yield path
    assert not path.exists(), "the payload ran"


def _genuine(run) -> dict:
    return torch.load(run["ckpt"], map_location="cpu", weights_only=True)


@pytest.fixture
def payloads(run, tmp_path, marker) -> dict[str, Path]:
    """``bare``: the payload object itself; ``hidden``: a real checkpoint carrying it in its
    hyper-parameters; ``state``: a plain state dict carrying it. Each in ``<dir>/checkpoints/`` of a
    run folder holding the tiny run's config.yaml (the scripts look for it there)."""
    folder = tmp_path / "payload_run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder.parent / "config.yaml").write_text(run["config"].read_text())
    paths = {name: folder / f"{name}.ckpt" for name in ("bare", "hidden", "state")}
    torch.save(Payload(marker), paths["bare"])
    checkpoint = _genuine(run)
    checkpoint["hyper_parameters"]["note"] = Payload(marker)
    torch.save(checkpoint, paths["hidden"])
    torch.save({**checkpoint["state_dict"], "extra": Payload(marker)}, paths["state"])
    return paths


def _with_hparams(run, tmp_path: Path, name: str, **updates) -> Path:
    checkpoint = _genuine(run)
    checkpoint["hyper_parameters"].update(updates)
    path = tmp_path / f"{name}.ckpt"
    torch.save(checkpoint, path)
    return path


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.strip().splitlines() if not line.startswith("/")]  # library warnings


def _subprocess(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


# ----------------------------------------------------------------------------- the fixture is live
def test_the_payload_runs_under_plain_pickle(payloads, marker):
    torch.load(payloads["bare"], weights_only=False)  # what the tools used to do
    assert marker.exists()
    marker.unlink()


# ----------------------------------------------------------------------------- (a) the library
@pytest.mark.parametrize("name", ["bare", "hidden", "state"])
def test_load_checkpoint_and_load_ranker_refuse_payloads(payloads, name):
    path = payloads[name]
    for load in (load_checkpoint, load_ranker):
        with pytest.raises(UnsafeCheckpointError) as info:
            load(str(path))
        message = str(info.value)
        assert "\n" not in message and str(path) in message
        assert "is refused" in message and "run code" in message


def test_files_that_are_not_checkpoints(tmp_path, run):
    with pytest.raises(FileNotFoundError, match=f"checkpoint {tmp_path / 'missing.ckpt'} does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    data = run["ckpt"].read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    torch.save(torch.zeros(3), tmp_path / "tensor.ckpt")
    with (tmp_path / "pickle.ckpt").open("wb") as f:
        pickle.dump({"state_dict": {}}, f, protocol=4)
    for name in ("text", "empty", "truncated", "tensor", "pickle"):
        path = tmp_path / f"{name}.ckpt"
        with pytest.raises(UnsafeCheckpointError) as info:
            load_checkpoint(path)
        assert str(info.value).startswith(f"{path} is not a checkpoint (") and "\n" not in str(info.value)


def test_only_optimizer_classes_are_accepted_beside_plain_values(tmp_path, marker):
    # A ranker built in Python records its optimizer class: such checkpoints still load ...
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"optimizer": torch.optim.Adam}},
               tmp_path / "python_built.ckpt")
    assert load_checkpoint(tmp_path / "python_built.ckpt")["hyper_parameters"]["optimizer"] is torch.optim.Adam
    # ... but no other callable, even a harmless-looking partial
    torch.save({"hyper_parameters": {"optimizer": functools.partial(torch.optim.SGD, lr=0.1)}},
               tmp_path / "partial.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="is refused: loading it would need to run code"):
        load_checkpoint(tmp_path / "partial.ckpt")


def test_a_genuine_checkpoint_loads_bit_identically(run):
    saved = _genuine(run)["state_dict"]
    for model in (load_ranker(str(run["ckpt"])), load_run_ranker(run["ckpt"], None, "test")):
        assert type(model) is MetricRanker
        state = model.state_dict()
        assert state.keys() == saved.keys()
        for key, value in saved.items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


def _legacy(value):
    """``value`` with the class paths written as releases before 0.2 wrote them (no package prefix)."""
    if isinstance(value, str):
        return value.removeprefix("robust_ranking.")
    if isinstance(value, dict):
        return {k: _legacy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_legacy(v) for v in value]
    return value


def test_a_checkpoint_of_a_release_before_the_package_still_loads(run, tmp_path):
    checkpoint = _genuine(run)
    checkpoint["hyper_parameters"] = _legacy(checkpoint["hyper_parameters"])
    assert checkpoint["hyper_parameters"]["_class_path"] == "lightning_modules.MetricRanker"
    torch.save(checkpoint, tmp_path / "old.ckpt")
    model = load_ranker(str(tmp_path / "old.ckpt"))
    assert type(model) is MetricRanker and type(model.backbone) is LeNet
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key


# ----------------------------------------------------------------------------- class-path allow-list
@pytest.fixture
def imports(monkeypatch) -> list[str]:
    """The modules imported through importlib.import_module while a test runs."""
    assert "this" not in sys.modules
    seen: list[str] = []
    real = importlib.import_module

    def spy(name, package=None):
        seen.append(name)
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", spy)
    return seen


@pytest.mark.parametrize(
    "class_path, error, expected",
    [
        ("this.Foo", UnsafeCheckpointError, "the model class 'this.Foo' is refused: not a robust_ranking.lightning_modules.Ranker"),
        ("os.system", UnsafeCheckpointError, "the model class 'os.system' is refused: not a robust_ranking.lightning_modules.Ranker"),
        ("lightning_modules_evil.Foo", UnsafeCheckpointError, "is refused"),
        ("robust_ranking.lightning_modules.MetricRanker; import this", UnsafeCheckpointError, "not a dotted class name"),
        ("lightning_modules", UnsafeCheckpointError, "not a dotted class name"),
        ("robust_ranking.lightning_modules.NotThere", ValueError, "lightning_modules has no NotThere"),
        ("robust_ranking.lightning_modules.LeNet", ValueError, "holds a robust_ranking.lightning_modules.LeNet, not a robust_ranking.lightning_modules.Ranker"),
    ],
)
def test_class_paths_are_checked_before_anything_is_imported(run, tmp_path, imports, capsys, class_path, error,
                                                             expected):
    path = _with_hparams(run, tmp_path, "class_path", _class_path=class_path)
    with pytest.raises(error) as info:
        load_ranker(str(path))
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert "this" not in sys.modules and all(name.startswith("robust_ranking.lightning_modules") for name in imports), imports
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "updates",
    [
        {"backbone": {"class_path": "this.Foo", "init_args": {}}},
        {"loss": {"class_path": "pytorch_metric_learning.losses.TripletMarginLoss",
                  "init_args": {"distance": {"class_path": "os.system"}}}},
        {"optimizer": "this.Foo"},
        {"_instantiator": "os.system"},
    ],
    ids=["backbone", "nested_distance", "callable_string", "instantiator"],
)
def test_the_recorded_model_config_may_only_name_allowed_code(run, tmp_path, imports, capsys, updates):
    path = _with_hparams(run, tmp_path, "nested", **updates)
    with pytest.raises(UnsafeCheckpointError, match="is refused"):
        load_ranker(str(path))
    with pytest.raises(SystemExit) as info:  # eval.py does not fall back to the run config either
        eval_script.main(["--ckpt", str(path), "--suite", str(run["suite"]), "--data-config", str(run["config"]),
                          "--accelerator", "cpu", "--no-progress"])
    assert info.value.code == 2
    assert "this" not in sys.modules and ZEN not in capsys.readouterr().out


# ----------------------------------------------------------------------------- (b), (c) eval.py
def test_eval_ckpt_refuses_a_payload(run, payloads, tmp_path):
    proc = _subprocess("eval.py", "--ckpt", str(payloads["hidden"]), "--suite", str(REPO / "configs/suites/quick.yaml"),
                       "--data-config", str(run["config"]), "--accelerator", "cpu", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"eval.py: error: {payloads['hidden']} is refused"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_source_refuses_a_payload(run, payloads, capsys):
    with pytest.raises(SystemExit) as info:
        eval_script.main(["--source", str(payloads["bare"]), "--ckpt", str(run["ckpt"]), "--suite", str(run["suite"]),
                          "--data-config", str(run["config"]), "--accelerator", "cpu", "--no-progress"])
    assert info.value.code == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"eval.py: error: {payloads['bare']} is refused"), lines


# ----------------------------------------------------------------------------- (d) WarmStart
@pytest.mark.parametrize("name", ["bare", "hidden", "state"])
def test_warm_start_refuses_a_payload(payloads, tmp_path, name):
    torch.manual_seed(0)
    model = MetricRanker(LeNet(embedding_dim=16), TripletMarginLoss(margin=0.2, distance=CosineSimilarity()))
    data = SyntheticDataModule(batch_size=16, samples_per_class=4, train_per_class=16, test_per_class=4)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, max_epochs=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[WarmStart(str(payloads[name]))])
    with pytest.raises(ValueError, match=f"^WarmStart: {payloads[name]} is refused: loading it would need to run code"):
        trainer.fit(model, datamodule=data)


# ----------------------------------------------------------------------------- (e) train.py --ckpt_path
def test_train_test_ckpt_path_refuses_a_payload(run, payloads, tmp_path):
    proc = _subprocess("train.py", "test", "--config", str(run["yaml"]), "--ckpt_path", str(payloads["hidden"]),
                       cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"train.py: error: --ckpt_path {payloads['hidden']} is refused"), \
        proc.stderr
    assert not (tmp_path / "runs").exists()


def test_train_ckpt_path_refuses_a_foreign_class_without_importing_it(run, tmp_path):
    path = _with_hparams(run, tmp_path, "this", _class_path="this.Foo")
    proc = _subprocess("train.py", "validate", "--config", str(run["yaml"]), "--ckpt_path", str(path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "the model class 'this.Foo' is refused" in lines[0], proc.stderr
    assert ZEN not in proc.stdout + proc.stderr


def test_train_test_ckpt_path_loads_a_genuine_checkpoint_weights_only(run, monkeypatch):
    seen = {}
    real_test = pl.Trainer.test

    @functools.wraps(real_test)
    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return real_test(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "test", spy)
    monkeypatch.chdir(run["root"])
    cli = train.main(["test", "--config", str(run["yaml"]), "--ckpt_path", str(run["ckpt"]),
                      "--weights_only", "false", "--trainer.logger", "false"])
    assert seen["weights_only"] is True and seen["ckpt_path"] == str(run["ckpt"])
    assert 0 < float(cli.trainer.callback_metrics["test/map"]) <= 1


# ----------------------------------------------------------------------------- (f) scripts and bench
@pytest.fixture
def load_program(monkeypatch):
    """``load_program("bench/sdha_cost.py")``: a script or benchmark imported by file path (no ``sys.path``
    edit), registered under its name so that the programs importing it as a sibling find it."""

    def load(relative: str):
        path = REPO / relative
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, path.stem, module)
        spec.loader.exec_module(module)
        return module

    return load


def test_pq_programs_refuse_a_payload(payloads, load_program, tmp_path, capsys):
    from robust_ranking.cli import kmeans_pq

    pq_ag_gradients = load_program("bench/pq_ag_gradients.py")
    for name in ("bare", "hidden"):
        with pytest.raises(SystemExit) as info:
            kmeans_pq.main(["--ckpt", str(payloads[name]), "--out", str(tmp_path / "out"), "--bits", "8"])
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and line.startswith(f"kmeans_pq: error: {payloads[name]} is refused"), line
        with pytest.raises(SystemExit, match=f"^error: {payloads[name]} is refused"):
            pq_ag_gradients.load_pq_run(payloads[name])
    assert not (tmp_path / "out").exists()


def test_sdha_bench_refuses_a_payload(payloads, tmp_path, load_program):
    sdha_cost = load_program("bench/sdha_cost.py")

    folder = tmp_path / "dch_run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder.parent / "config.yaml").write_text("""
model:
  class_path: robust_ranking.lightning_modules.DCHRanker
  init_args:
    backbone: {class_path: robust_ranking.lightning_modules.C2F1, init_args: {embedding_dim: 16}}
    loss: {class_path: robust_ranking.lightning_modules.DCHLoss}
    hash_bits: 16
data:
  class_path: robust_ranking.data.SyntheticDataModule
  init_args: {test_per_class: 4}
""")
    path = folder / "bare.ckpt"
    path.write_bytes(payloads["bare"].read_bytes())
    with pytest.raises(SystemExit, match=f"^error: {path} is refused"):
        sdha_cost.make_model(sdha_cost.parse_args(["--ckpt", str(path), "--device", "cpu"]))


# ----------------------------------------------------------------------------- CIFAR-10 batches
def test_cifar10_batches_refuse_a_payload(tmp_path, marker):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": np.zeros((10, 3072), dtype=np.uint8), b"labels": list(range(10))}
        if name == "data_batch_3":
            batch[b"batch_label"] = Payload(marker)
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f)
    with pytest.raises(DataConfigError) as info:
        CIFAR10DataModule(root=str(tmp_path), download=False).setup()
    message = str(info.value)
    assert message.startswith(f"{folder / 'data_batch_3'} is refused: not a plain CIFAR batch") and "\n" not in message
