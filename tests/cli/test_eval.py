"""eval.py end to end on a tiny CLI-trained checkpoint: reports, one-line argument errors,
interrupted runs, and DDP (gloo, 2 processes) giving exactly the single-process numbers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from run_helpers import REPO, run_eval, strip_timing
from robust_ranking.evaluation.engine import RobustnessEvaluator


def test_eval_writes_json_and_markdown(tiny_run, capsys):
    (report,) = run_eval(["--ckpt", str(tiny_run["ckpt"]), "--suite", str(tiny_run["suite"])])
    out_dir = tiny_run["run"] / "robustness"
    stem = f"{tiny_run['ckpt'].stem}.eval-test"  # reports are named after the checkpoint and the suite
    data = json.loads((out_dir / f"{stem}.json").read_text())
    assert data == json.loads(report.to_json())
    assert data["checkpoint"] == str(tiny_run["ckpt"]) and data["suite"]["name"] == "eval-test"
    assert data["num_samples"] == 21 and data["gallery_size"] == 100 and data["world_size"] == 1
    assert [(r["attack"], r.get("w", r.get("m"))) for r in data["results"]] == [
        ("CA+", 1), ("CA+", 2), ("CA-", 1), ("QA-", 1), ("ES", None)]
    assert data["versions"]["torch"] == torch.__version__
    assert 0 < data["clean"]["recall@1"] <= 1 and 0 < data["clean"]["map"] <= 1
    markdown = (out_dir / f"{stem}.md").read_text()
    assert "| ε | CA+ w=1 | 2 | CA- w=1 | QA- m=1 |" in markdown
    assert markdown in capsys.readouterr().out
    assert not (out_dir / f"{stem}.partial.json").exists()


def test_data_config_and_output_dir(tiny_run, tmp_path):
    lone = tmp_path / "lone.ckpt"  # no run config next to it
    shutil.copy(tiny_run["ckpt"], lone)
    run_eval(["--ckpt", str(lone), "--suite", str(tiny_run["suite"]), "--data-config",
              str(tiny_run["run"] / "config.yaml"), "--output-dir", str(tmp_path / "out"), "--num-samples", "5",
              "--batch-size", "5"])
    data = json.loads((tmp_path / "out" / "lone.eval-test.json").read_text())
    assert data["num_samples"] == 5 and data["suite"]["batch_size"] == 5


def _not_a_ranker(tmp_path: Path) -> Path:
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2, 2)}, "hyper_parameters": {}}, path)
    return path


def _text_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.ckpt"
    path.write_text("not a checkpoint")
    return path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_ckpt", "checkpoint {tmp}/missing.ckpt does not exist"),
        ("unknown_attack", "unknown attack 'ca+' (did you mean 'CA+'?); known attacks: CA+, CA-, QA+, QA-, ES"),
        ("typo", "unknown key 'step' (did you mean 'steps'?)"),
        ("eps", "epsilon 3 is outside [0, 1]"),
        ("w_too_large", "w=200 needs a gallery of more than 200 items, but the gallery has 100"),
        ("not_a_ranker", "cannot load a Ranker from {tmp}/other.ckpt"),
        ("text_file", "{tmp}/notes.ckpt is not a checkpoint"),
        ("no_data_config", "pass --data_config"),
        ("bad_num_samples", "num_samples must be an integer >= 1 or -1"),
        ("bad_flag", "unrecognized arguments: --epsilon"),
    ],
)
def test_argument_errors_are_one_line_and_exit_2(tiny_run, tmp_path, capsys, monkeypatch, case, expected):
    calls = []
    monkeypatch.setattr(RobustnessEvaluator, "run", lambda *a, **k: calls.append(1))
    suite = tiny_run["suite"]
    ckpt = str(tiny_run["ckpt"])
    extra: list[str] = []
    if case in ("unknown_attack", "typo", "eps", "w_too_large"):
        attack = {"unknown_attack": "{attack: ca+, epsilons: [0.1]}", "typo": "{attack: CA+, epsilons: [0.1], step: 3}",
                  "eps": "{attack: CA+, epsilons: [3]}", "w_too_large": "{attack: CA+, epsilons: [0.1], w: [200]}"}[case]
        suite = tmp_path / "bad.yaml"
        suite.write_text(f"attacks: [{attack}]")
    elif case == "missing_ckpt":
        ckpt = str(tmp_path / "missing.ckpt")
    elif case == "not_a_ranker":
        ckpt = str(_not_a_ranker(tmp_path))
    elif case == "text_file":
        ckpt = str(_text_file(tmp_path))
    elif case == "no_data_config":
        ckpt = str(shutil.copy(tiny_run["ckpt"], tmp_path / "lone.ckpt"))
    elif case == "bad_num_samples":
        extra = ["--num-samples", "0"]
    elif case == "bad_flag":
        extra = ["--epsilon", "0.1"]
    with pytest.raises(SystemExit) as info:
        run_eval(["--ckpt", ckpt, "--suite", str(suite), *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if not line.startswith("/")]  # library warnings carry a file path
    assert len(lines) == 1 and lines[0].startswith("eval.py: error: "), err
    assert expected.format(tmp=tmp_path) in lines[0]
    assert not calls, "errors must come before any attack runs"


def test_interrupted_run_keeps_the_finished_report(tiny_run, tmp_path, monkeypatch):
    args = ["--ckpt", str(tiny_run["ckpt"]), "--suite", str(tiny_run["suite"]), "--output-dir", str(tmp_path)]
    run_eval(args)
    stem = f"{tiny_run['ckpt'].stem}.eval-test"
    finished = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert set(finished) == {f"{stem}.json", f"{stem}.md", f"{stem}.curves.png"}
    assert (tmp_path / "tensorboard" / stem).is_dir()  # the checkpoint's TensorBoard sub-run

    original = RobustnessEvaluator._reduce
    count = {"n": 0}

    def crash_on_second(self, *a, **k):
        count["n"] += 1
        if count["n"] == 2:
            raise RuntimeError("simulated crash mid-run")
        return original(self, *a, **k)

    monkeypatch.setattr(RobustnessEvaluator, "_reduce", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval([*args, "--overwrite"])  # without it the finished report is reused, nothing recomputed
    for name, content in finished.items():
        assert (tmp_path / name).read_bytes() == content, f"{name} was overwritten by a partial run"
    partial = json.loads((tmp_path / f"{stem}.partial.json").read_text())
    assert partial["partial"] is True and len(partial["results"]) == 1  # progress of the broken run
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


@pytest.mark.slow
def test_ddp_two_processes_give_the_single_process_numbers(tiny_run, tmp_path):
    """World size 2 (gloo, CPU) and world size 1 write the same numbers, exactly: targets are
    keyed per sample, every forward has the same batch shape and the reduction is in sample
    order (see robust_ranking/evaluation/engine.py), so no tolerance is needed. The suite adds
    RobRank's ERS attacks (TMA, ES:R, LTM, GTM, GTT) to the tiny one, so they too run in real
    processes, not only on thread-simulated ranks (tests/attacks/test_ers_attacks.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    suite = tmp_path / "suite.yaml"
    suite.write_text(tiny_run["suite"].read_text() + "".join(
        f"  - {{attack: {name}, epsilons: [0.1], steps: 2}}\n" for name in ("TMA", "ES:R", "LTM", "GTM", "GTT")))
    reports = {}
    for devices in (2, 1):
        out = tmp_path / f"devices{devices}"
        proc = subprocess.run(
            [sys.executable, str(REPO / "eval.py"), "--ckpt", str(tiny_run["ckpt"]), "--suite", str(suite),
             "--accelerator", "cpu", "--devices", str(devices), "--output-dir", str(out), "--no-progress"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[devices] = json.loads((out / f"{tiny_run['ckpt'].stem}.eval-test.json").read_text())
    assert reports[2]["world_size"] == 2 and reports[1]["world_size"] == 1
    assert {"TMA", "ES:R", "LTM", "GTM", "GTT"} <= {row["attack"] for row in reports[1]["results"]}
    assert strip_timing(reports[2]) == strip_timing(reports[1])


def test_the_readme_python_example_runs(tiny_run, tmp_path, capsys):
    """The README's benchmarking example, run as written on a tiny checkpoint (paths substituted)."""
    import re

    text = (REPO / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    snippet = snippet.replace("runs/fashion_mnist_ct/version_0/checkpoints/last.ckpt", str(tiny_run["ckpt"]))
    snippet = snippet.replace("configs/suites/quick.yaml", str(tiny_run["suite"]))
    snippet = snippet.replace('accelerator="cpu"', f'accelerator="cpu", output_dir={str(tmp_path)!r}, progress=False')
    exec(compile(snippet, "README.md", "exec"), {})
    score, path = capsys.readouterr().out.split()[-2:]
    assert 0 <= float(score) <= 1 and Path(path) == tmp_path / f"{tiny_run['ckpt'].stem}.eval-test.json"


def test_a_shipped_suite_by_name(tiny_run, tmp_path):
    (report,) = run_eval(["--ckpt", str(tiny_run["ckpt"]), "--suite", "quick", "--num-samples", "4",
                          "--no-sanity", "--output-dir", str(tmp_path)])
    assert report.data["suite_file"].endswith("configs/suites/quick.yaml")
    assert (tmp_path / f"{tiny_run['ckpt'].stem}.quick.json").is_file()
