"""bench/gpu_check.sh (syntax, its CPU fallback) and the GPU-marked checks it runs: GPU faiss = CPU faiss on
the metrics' path, and eval.py on one GPU (Lightning, inference mode) = the CPU report. The GPU tests are
marked ``gpu`` and skipped without CUDA (``pytest -m gpu`` selects them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from robust_ranking.retrieval.index import FaissFlatIndex, faiss_gpu_available
from run_helpers import REPO, strip_timing

SCRIPT = REPO / "bench" / "gpu_check.sh"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_gpu_check_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow
def test_gpu_check_cpu_fallback_exits_cleanly() -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(SCRIPT), "--cpu"], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no CUDA GPU visible" in done.stdout
    assert "gpu_check summary" in done.stdout and "FAIL" not in done.stdout
    assert "attack cost (CPU, LeNet, T = 8)" in done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not faiss_gpu_available(), reason="needs GPU faiss")
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_faiss_gpu_equals_faiss_cpu(metric: str) -> None:
    """Same ids and distances from the GPU and CPU flat indexes, ties included (integer-valued codes:
    every distance is exact in float32, so both must give the (distance, id) order)."""
    g = torch.Generator().manual_seed(0)
    db = torch.randint(-3, 4, (5000, 16), generator=g).float()
    queries = torch.cat([db[:50], torch.randint(-3, 4, (50, 16), generator=g).float()])
    cpu, gpu = FaissFlatIndex(metric, use_gpu=False), FaissFlatIndex(metric, use_gpu=True)
    cpu.add(db)
    gpu.add(db)
    for k in (1, 10, 100):
        d_cpu, i_cpu = cpu.search(queries, k)
        d_gpu, i_gpu = gpu.search(queries, k)
        assert torch.equal(i_gpu, i_cpu)
        torch.testing.assert_close(d_gpu, d_cpu, atol=1e-4, rtol=0)


@pytest.mark.gpu
@needs_cuda
def test_eval_on_one_gpu_matches_cpu(tiny_run, tmp_path) -> None:
    """eval.py on one GPU (Lightning Trainer.test, inference_mode=True; the attacks leave inference mode
    themselves) gives the CPU report's numbers up to GPU float rounding."""
    from robust_ranking.cli import eval as eval_script

    reports = {}
    for accelerator in ("cpu", "gpu"):
        out = tmp_path / accelerator
        eval_script.main(["--ckpt", str(tiny_run["ckpt"]), "--suite", str(tiny_run["suite"]), "--accelerator",
                          accelerator, "--devices", "1", "--output_dir", str(out), "--no-progress"])
        (path,) = out.glob("*.json")
        report = json.loads(path.read_text())
        assert report["meta"]["accelerator"] == accelerator
        reports[accelerator] = strip_timing(report)
    cpu, gpu = reports["cpu"], reports["gpu"]
    assert gpu["indices"] == cpu["indices"] and gpu["T"] == cpu["T"]
    for key, value in cpu["clean"].items():
        assert gpu["clean"][key] == pytest.approx(value, abs=1e-3), key
    for r_cpu, r_gpu in zip(cpu["results"], gpu["results"]):
        assert (r_gpu["attack"], r_gpu["eps"]) == (r_cpu["attack"], r_cpu["eps"])
        for key, value in r_cpu.items():
            if isinstance(value, float):  # attack metrics: a few instances may flip on rounding
                assert r_gpu[key] == pytest.approx(value, abs=2.0), (r_cpu["attack"], key)
