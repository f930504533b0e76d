#!/usr/bin/env bash
# A ready GPU check (docs/scale.md, "GPU check"); on a machine with CUDA GPUs it runs in a few minutes:
#   1. the GPU-marked tests (pytest -m gpu): GPU faiss = CPU faiss, CUDA retrieval = CPU, eval.py on one GPU
#      (inference mode, Lightning Trainer) = the CPU report;
#   2. with >= 2 GPUs: a tiny eval.py run with --devices 2 vs --devices 1, report numbers compared;
#   3. the 224-pixel ResNet-18 attack cost (bench/attack_cost.py) in fp32 and bf16-mixed + channels_last;
# then one summary table. Without CUDA it says so, runs its CPU fallbacks (the GPU tests are collected and
# skipped; a tiny CPU attack-cost run) and exits 0.
#
#   bash bench/gpu_check.sh                 # PYTHON=... to choose the interpreter (default .venv/bin/python)
#   bash bench/gpu_check.sh --cpu           # the CPU fallback even where GPUs are visible
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
SUMMARY=()
FAILED=0
row() { SUMMARY+=("$(printf '%-34s %-6s %s' "$1" "$2" "$3")"); [ "$2" = FAIL ] && FAILED=1; return 0; }

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
[ "${1:-}" = --cpu ] && NGPU=0

if [ "$NGPU" -eq 0 ]; then
    echo "gpu_check: no CUDA GPU visible (torch.cuda.device_count() == 0): GPU checks not run; CPU fallbacks only"
    export CUDA_VISIBLE_DEVICES=""
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    # 1. the GPU subset is collected and skipped (markers and skip conditions work)
    if out=$("$PY" -m pytest -m gpu -p no:cacheprovider tests/bench/test_gpu_check.py tests/retrieval/test_retrieval_index.py \
              tests/retrieval/test_retrieval_metrics.py 2>&1); then
        row "gpu tests (pytest -m gpu)" SKIP "$(echo "$out" | grep -E "passed|skipped|failed|error" | tail -1)"
    else
        row "gpu tests (pytest -m gpu)" FAIL "$(echo "$out" | tail -1)"
    fi
    # 2. a tiny CPU attack cost (the benchmark's code path, not its numbers)
    if out=$("$PY" bench/attack_cost.py --model lenet --data synthetic --gallery-size 100 --num-samples 8 \
              --attacks CA+ --threads 1 --device cpu 2>&1); then
        row "attack cost (CPU, LeNet, T = 8)" OK "ratio $(echo "$out" | awk '$1 == "all" {print $NF}')"
    else
        row "attack cost (CPU, LeNet, T = 8)" FAIL "$(echo "$out" | tail -1)"
    fi
    row "2-GPU DDP eval = 1 GPU" SKIP "no CUDA GPU"
    row "ResNet-18 224 px cost on GPU" SKIP "no CUDA GPU"
else
    echo "gpu_check: $NGPU CUDA GPU(s): $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')"
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
    # 1. the GPU-marked tests
    if out=$(timeout 300 "$PY" -m pytest -m gpu -p no:cacheprovider tests 2>&1); then
        row "gpu tests (pytest -m gpu)" OK "$(echo "$out" | grep -E "passed|skipped|failed|error" | tail -1)"
    else
        echo "$out" | tail -30
        row "gpu tests (pytest -m gpu)" FAIL "$(echo "$out" | tail -1)"
    fi
    # 2. eval.py --devices 2 vs --devices 1 on a tiny trained ranker
    if [ "$NGPU" -ge 2 ]; then
        if out=$(timeout 240 env PYTHONPATH=tests "$PY" - "$WORK" "$PY" <<'EOF' 2>&1
import json, subprocess, sys
from pathlib import Path
from run_helpers import strip_timing, train_tiny_run
work, py = Path(sys.argv[1]), sys.argv[2]
run = train_tiny_run(work)
reports = []
for n in (1, 2):
    out = work / f"devices{n}"
    subprocess.run([py, "eval.py", "--ckpt", str(run["ckpt"]), "--suite", str(run["suite"]), "--accelerator", "gpu",
                    "--devices", str(n), "--output_dir", str(out), "--no-progress"], check=True, capture_output=True)
    (path,) = out.glob("*.json")
    reports.append(strip_timing(json.loads(path.read_text())))
def numbers(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from numbers(v, f"{path}[{i}]")
    else:
        yield path, x
one, two = dict(numbers(reports[0])), dict(numbers(reports[1]))
assert one.keys() == two.keys(), "the reports differ in layout"
diff = max((abs(one[k] - two[k]) for k in one if isinstance(one[k], float) and isinstance(two[k], float)), default=0.0)
exact = all(one[k] == two[k] for k in one if not isinstance(one[k], float))
print(f"max |diff| {diff:.2e}, non-float fields equal: {exact}")
sys.exit(0 if exact and diff <= 1e-3 else 1)
EOF
        ); then
            row "2-GPU DDP eval = 1 GPU" OK "$(echo "$out" | tail -1)"
        else
            echo "$out" | tail -30
            row "2-GPU DDP eval = 1 GPU" FAIL "$(echo "$out" | tail -1)"
        fi
    else
        row "2-GPU DDP eval = 1 GPU" SKIP "$NGPU GPU visible"
    fi
    # 3. the 224-pixel ResNet-18 attack cost on the GPU, fp32 and bf16-mixed + channels_last
    for variant in "32" "bf16-mixed --channels-last"; do
        if out=$(timeout 180 "$PY" bench/attack_cost.py --backbone resnet18 --image-size 224 --data synthetic \
                  --gallery-size 1000 --num-samples 100 --batch-size 50 --attacks CA+,QA+,ES --device cuda \
                  --precision $variant 2>&1); then
            echo "$out"
            row "RN18 224 px cost ($variant)" OK "ratio $(echo "$out" | awk '$1 == "all" {print $NF}') (attack s / f+b s: $(echo "$out" | awk '$1 == "all" {print $2 " / " $3}'))"
        else
            echo "$out" | tail -20
            row "RN18 224 px cost ($variant)" FAIL "$(echo "$out" | tail -1)"
        fi
    done
fi

echo
echo "gpu_check summary ($(( $(date +%s) - START )) s)"
printf '%-34s %-6s %s\n' "check" "result" "detail"
for line in "${SUMMARY[@]}"; do echo "$line"; done
[ "$NGPU" -eq 0 ] && exit 0
exit $FAILED
