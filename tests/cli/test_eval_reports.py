"""eval.py never loses a report: suite-named reports, resume after an interruption, SIGINT / SIGTERM,
writability checked first, reports created with the user's umask, NaN models exit non-zero."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from robust_ranking.cli import eval as eval_script
from robust_ranking.evaluation.engine import RobustnessEvaluator
from run_helpers import REPO, run_eval, strip_timing

LONG_SUITE = """
name: long
num_samples: 21
seed: 0
batch_size: 7
sanity: false
attacks:
  - {attack: CA+, epsilons: [0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3], w: [1, 2, 5], steps: 30}
"""


def args_for(tiny_run, out: Path, *extra: str) -> list[str]:  # noqa: F811
    return ["--ckpt", str(tiny_run["ckpt"]), "--suite", str(tiny_run["suite"]), "--output-dir", str(out), *extra]


def test_reports_are_named_after_checkpoint_and_suite(tiny_run, tmp_path):  # noqa: F811
    other = tmp_path.parent / f"{tmp_path.name}-other.yaml"
    other.write_text(tiny_run["suite"].read_text().replace("name: eval-test", "name: other-suite"))
    run_eval(args_for(tiny_run, tmp_path))
    run_eval(["--ckpt", str(tiny_run["ckpt"]), "--suite", str(other), "--output-dir", str(tmp_path)])
    stem = tiny_run["ckpt"].stem
    reports = [f"{stem}.eval-test.json", f"{stem}.eval-test.md", f"{stem}.other-suite.json", f"{stem}.other-suite.md"]
    figures = [f"{stem}.eval-test.curves.png", f"{stem}.other-suite.curves.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*reports, *figures, "tensorboard"])
    assert sorted(p.name for p in (tmp_path / "tensorboard").iterdir()) == [f"{stem}.eval-test", f"{stem}.other-suite"]
    mask = os.umask(0o022)
    os.umask(mask)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o666 & ~mask, f"{path.name} must follow the umask"


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tiny_run, tmp_path, monkeypatch, capsys):  # noqa: F811
    (reference,) = run_eval(args_for(tiny_run, tmp_path / "reference"))

    out = tmp_path / "interrupted"
    original = RobustnessEvaluator._reduce
    reduced, stops = [], [2]

    def stop_after_two(self, *a, **k):
        result = original(self, *a, **k)
        reduced.append(result.label)
        if len(reduced) in stops:  # as if Ctrl-C came during the third configuration (once)
            stops.clear()
            eval_script._STOP_SIGNAL[0] = signal.SIGINT
        return result

    monkeypatch.setattr(RobustnessEvaluator, "_reduce", stop_after_two)
    with pytest.raises(SystemExit) as info:
        run_eval(args_for(tiny_run, out))
    assert info.value.code == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"eval.py: interrupted after 2 of 5 configurations; run the same command to resume "
                   f"(partial report: {out / (tiny_run['ckpt'].stem + '.eval-test.partial.json')})"]
    stem = f"{tiny_run['ckpt'].stem}.eval-test"
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.partial.json", "tensorboard"]  # no finished report
    partial = json.loads((out / f"{stem}.partial.json").read_text())
    assert partial["partial"] is True and len(partial["results"]) == 2

    reduced.clear()
    (resumed,) = run_eval(args_for(tiny_run, out))  # the same command again
    assert len(reduced) == 3 + 3, "only the 3 missing configurations (+ 3 sanity checks) may run again"
    assert resumed.data["meta"]["resumed_configurations"] == 2
    assert strip_timing(resumed.data) == strip_timing(reference.data)
    assert not (out / f"{stem}.partial.json").exists()

    reduced.clear()
    (again,) = run_eval(args_for(tiny_run, out))  # finished: reused, nothing recomputed
    assert reduced == [] and again.data == resumed.data
    assert "is up to date" in capsys.readouterr().out
    run_eval(args_for(tiny_run, out, "--overwrite"))
    assert len(reduced) == 5 + 3


def test_a_report_of_another_run_is_not_replaced_without_overwrite(tiny_run, tmp_path, capsys):  # noqa: F811
    run_eval(args_for(tiny_run, tmp_path))
    stem = f"{tiny_run['ckpt'].stem}.eval-test"
    before = (tmp_path / f"{stem}.json").read_bytes()
    with pytest.raises(SystemExit) as info:
        run_eval(args_for(tiny_run, tmp_path, "--num-samples", "5"))  # same names, another suite content
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("eval.py: error: ") and "is a finished report of another run" in line and "--overwrite" in line
    assert (tmp_path / f"{stem}.json").read_bytes() == before


def test_unwritable_output_and_inapplicable_suite_fail_before_any_work(tiny_run, tmp_path, capsys, monkeypatch):  # noqa: F811
    calls = []
    monkeypatch.setattr(RobustnessEvaluator, "run", lambda *a, **k: calls.append(1))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    pq_suite = tmp_path / "pq.yaml"
    pq_suite.write_text("name: pq\nattacks: [{attack: 'PQ-AG:APD', epsilons: [0.03]}]\n")
    cases = [
        (args_for(tiny_run, blocker / "reports"), f"cannot write reports to {blocker / 'reports'}"),
        (["--ckpt", str(tiny_run["ckpt"]), "--suite", str(pq_suite), "--output-dir", str(tmp_path)],
         "no attack of suite 'pq' applies to"),
    ]
    for args, expected in cases:
        with pytest.raises(SystemExit) as info:
            run_eval(args)
        assert info.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("eval.py: error: ") and expected in line, line
    assert not calls


def test_nan_weights_write_an_invalid_report_and_exit_3(tiny_run, tmp_path, capsys):  # noqa: F811
    checkpoint = torch.load(tiny_run["ckpt"], map_location="cpu", weights_only=True)
    name = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    checkpoint["state_dict"][name] = torch.full_like(checkpoint["state_dict"][name], math.nan)
    nan_ckpt = tiny_run["ckpt"].with_name("nan-weights.ckpt")
    torch.save(checkpoint, nan_ckpt)
    try:
        with pytest.raises(SystemExit) as info:
            run_eval(["--ckpt", str(nan_ckpt), "--suite", str(tiny_run["suite"]), "--output-dir", str(tmp_path)])
    finally:
        nan_ckpt.unlink()
    assert info.value.code == eval_script.EXIT_INVALID
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eval.py: error")]
    assert len(errors) == 1 and "no robustness score: " in errors[0] and "gallery embeddings are NaN" in errors[0]
    data = json.loads((tmp_path / "nan-weights.eval-test.json").read_text())
    assert data["robustness_score"] is None and data["score_invalid"]
    assert all(row["mean"] is None and row["invalid"] for row in data["results"])


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_within_a_batch_and_leave_a_valid_partial_report(tiny_run, tmp_path, signum):  # noqa: F811
    suite = tmp_path / "long.yaml"
    suite.write_text(LONG_SUITE)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "eval.py"), "--ckpt", str(tiny_run["ckpt"]), "--suite", str(suite),
         "--accelerator", "cpu", "--output-dir", str(out), "--no-progress"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = out / f"{tiny_run['ckpt'].stem}.long.partial.json"
    deadline = time.monotonic() + 120
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    sent = time.monotonic()
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10, "must stop within one attack batch"
    assert proc.returncode == 128 + signum
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("eval.py: interrupted after "), stderr[-2000:]
    assert "of 21 configurations; run the same command to resume" in lines[0] and "Traceback" not in stderr
    data = json.loads(partial.read_text())
    assert data["partial"] is True and 1 <= len(data["results"]) < 21
    assert not (out / f"{tiny_run['ckpt'].stem}.long.json").exists()
