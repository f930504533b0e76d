#!/usr/bin/env bash
# Defenses side by side on Fashion-MNIST at one CPU budget (docs/results/defenses.md): vanilla, EST
# (max-shift), ACT and HM trained on from one shared vanilla model for the same number of steps,
# then benchmarked with RobRank's ERS suite and the ECCV 2020 defense-check cells; the same for the
# DCH-32 hashing and DPQN-24 PQ models with the SDHA (CPU-budget sdha_defense_check) and PQ-AG suites.
#
#   bash bench/defense_side_by_side.sh [OUT] [STAGE ...]
#
# OUT defaults to runs/defense_side_by_side. STAGES (default: all, in this order):
#   ct-base ct-arms ct-eval       metric learning: CT (C2F1, cosine triplet)
#   dch-base dch-arms dch-eval    DCH, 32 bits, SDHA / HAG (sdha_defense_check suite)
#   dpqn-base dpqn-arms dpqn-eval DPQN, 24 bits, PQ-AG suite
# A stage whose checkpoint / report exists is skipped, so an interrupted run goes on where it stopped.
#
# The budget (the same for every arm of a family): the family's vanilla base (CT: 1 epoch, DCH / DPQN:
# 2 epochs from scratch), then ONE epoch of each arm warm-started from it (vanilla: plain steps; the
# defenses: their own adversary at RobRank's 28x28 budget eps = 77/255, cut from 32 to 10 PGD steps
# with alpha = 10/255 so PGD still travels 1.3 eps; HM's margin scaled to each ranker's distance range, see
# family() below), learning rate 1e-3 (Adam), seed 0.
# Environment: PYTHON (default .venv/bin/python), DEFENSE_ARMS for the hashing / PQ families
# (default: "max_shift hm"), ERS_T (default 500), DRY_RUN=1 (print the train.py / eval.py commands, one
# per line, instead of running them; tests/bench/test_defense_side_by_side.py parses them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-runs/defense_side_by_side}
shift || true
STAGES=${*:-ct-base ct-arms ct-eval dch-base dch-arms dch-eval dpqn-base dpqn-arms dpqn-eval}
ARMS=${DEFENSE_ARMS:-max_shift hm}
ERS_T=${ERS_T:-500}
EPS=0.30196078431372547    # 77/255
ALPHA=0.0392156862745098   # 10/255
STEPS=10
mkdir -p "$OUT/callbacks"
run() {  # a train.py / eval.py command, or its shell-quoted line under DRY_RUN
  if [[ -n ${DRY_RUN:-} ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# The callback list of one arm: keep the last checkpoint, warm-start from the base, then the defense.
defense_callback() {  # $1: arm name, $2: HM margin (hardness, in the ranker's distance units)
  case "$1" in
    vanilla) ;;
    max_shift) printf -- '- class_path: robust_ranking.callbacks.MaxShiftAdversarialTraining\n  init_args: {eps: %s, alpha: %s, steps: %s, random_start: false}\n' "$EPS" "$ALPHA" "$STEPS" ;;
    act) printf -- '- class_path: robust_ranking.callbacks.AntiCollapseTripletTraining\n  init_args: {eps: %s, alpha: %s, steps: %s, strategy: random}\n' "$EPS" "$ALPHA" "$STEPS" ;;
    hm) printf -- '- class_path: robust_ranking.callbacks.HardnessManipulationTraining\n  init_args: {eps: %s, alpha: %s, steps: %s, source: softhard, destination: lga, margin: %s, ics_weight: 0.5}\n' "$EPS" "$ALPHA" "$STEPS" "$2" ;;
    *) echo "unknown arm $1" >&2; exit 2 ;;
  esac
}
callbacks_yaml() {  # $1: arm, $2: base checkpoint, $3: HM margin -> path of the callback list
  local file="$OUT/callbacks/$1.$(basename "$(dirname "$(dirname "$(dirname "$2")")")").yaml"
  {
    printf -- '- class_path: pytorch_lightning.callbacks.ModelCheckpoint\n  init_args: {save_last: true, save_top_k: 0}\n'
    printf -- '- class_path: robust_ranking.callbacks.WarmStart\n  init_args: {ckpt_path: %s}\n' "$2"
    defense_callback "$1" "$3"
  } > "$file"
  echo "$file"
}
train() {  # $1: run name, rest: train.py arguments
  local name=$1; shift
  if [[ -f "$OUT/$name/version_0/checkpoints/last.ckpt" ]]; then echo "== $name: done"; return; fi
  [[ -n ${DRY_RUN:-} ]] || echo "== $name: training"
  run "$PY" train.py fit "$@" --trainer.logger.init_args.save_dir "$OUT" \
      --trainer.logger.init_args.name "$name" --trainer.logger.init_args.version 0 \
      --trainer.enable_progress_bar false
}
last() { echo "$OUT/$1/version_0/checkpoints/last.ckpt"; }
evaluate() {  # $1: output dir, $2: suite, rest: eval.py arguments
  local dir=$1 suite=$2; shift 2
  if [[ -f "$dir/comparison.md" ]]; then echo "== $dir: done"; return; fi
  [[ -n ${DRY_RUN:-} ]] || echo "== $dir: evaluating ($suite)"
  run "$PY" eval.py --suite "$suite" --output_dir "$dir" --progress false "$@"
}

family() {  # $1: family (ct / dch / dpqn), $2: stage (base / arms / eval)
  local fam=$1 stage=$2 config base_args arms margin
  # HM's margin (gamma and u of the gradual adversary) is a hardness d(a,p) - d(a,n) in the ranker's distance
  # units: 0.2 of CT's cosine distance range [0, 2], scaled to the same fraction of DCH-32's relaxed Hamming
  # range [0, 32] and of DPQN's Euclidean range [0, 4] (4 unit sub-vectors).
  case "$fam" in
    ct) config=configs/fashion_mnist_ct.yaml; base_args=(--trainer.max_epochs 1); arms="vanilla max_shift act hm"
        margin=0.2 ;;
    dch) config=configs/fashion_mnist_dch_32.yaml; base_args=(--trainer.max_epochs 2); arms="vanilla $ARMS"
         margin=3.2 ;;
    dpqn) config=configs/fashion_mnist_dpqn_24bit.yaml; base_args=(--trainer.max_epochs 2); arms="vanilla $ARMS"
          margin=0.4 ;;
    *) echo "defense_side_by_side.sh: unknown stage $fam-$stage (families: ct dch dpqn)" >&2; exit 2 ;;
  esac
  case "$stage" in
    base)
      train "${fam}_base" --config "$config" "${base_args[@]}" \
          --model.init_args.lr_scheduler.init_args.T_max "${base_args[1]}" ;;
    arms)
      for arm in $arms; do
        train "${fam}_$arm" --config "$config" --trainer.max_epochs 1 \
            --model.init_args.lr_scheduler.init_args.T_max 1 \
            --trainer.callbacks "$(callbacks_yaml "$arm" "$(last "${fam}_base")" "$margin")"
      done ;;
    eval)
      local ckpts=()
      for arm in $arms; do ckpts+=("$(last "${fam}_$arm")"); done
      case "$fam" in
        ct)
          evaluate "$OUT/eval_ct_ers" robrank_ers_28 --num_samples "$ERS_T" --ckpt "${ckpts[@]}"
          evaluate "$OUT/eval_ct_eccv" eccv2020_28x28_defense_check --ckpt "${ckpts[@]}" ;;
        dch) evaluate "$OUT/eval_dch_sdha" sdha_defense_check --ckpt "${ckpts[@]}" ;;
        dpqn) evaluate "$OUT/eval_dpqn_pqag" pqag_table --ckpt "${ckpts[@]}" ;;
      esac ;;
    *) echo "defense_side_by_side.sh: unknown stage $fam-$stage (stages: base arms eval)" >&2; exit 2 ;;
  esac
}

for s in $STAGES; do
  family "${s%%-*}" "${s#*-}"
done
[[ -n ${DRY_RUN:-} ]] || echo "== done: $OUT"
