#!/usr/bin/env bash
# CPU-scale reproduction of the paper's comparison on the State-of-the-Union corpus (about an hour on
# 2 cores; `make experiments`). Runs one after another, single process each (no launcher needed):
#
#   tiny-4l               4 layers, no loop                      (the deep baseline)
#   tiny-2l               2 layers, no loop                      (same parameters as the 2-layer loops)
#   tiny-2l-2loop         2 shared layers x 2 loops, vector gates
#   tiny-2l-2loop-nogate  the same without gates (--loop-gates none)
#   tiny-2l-3loop         2 shared layers x 3 loops, vector gates
#   tiny-1l-4loop         1 shared layer x 4 loops, vector gates
#   tiny-1l-4loop-nogate  the same without gates
#   tiny-1l               1 layer, no loop        } the paper's small pair (lite-45m vs loop-45m),
#   tiny-1l-2loop         1 shared layer x 2 loops} scaled down
#
# All runs share data, token budget, seed and hyper-parameters. Then every looped model is evaluated at
# 1..2x its trained loop count (tools/evaluate.py), and tools/plot_runs.py writes
#   $OUT/loss_curves.png, $OUT/results.md, $OUT/loss_vs_loops.{png,md}
#
# Settings (environment variables):
#   BUDGET_MINUTES=60   total wall-clock budget; sets TRAIN_ITERS by timing a few steps of the slowest model
#   TRAIN_ITERS=        fix the iterations per run instead (then BUDGET_MINUTES is ignored)
#   MICRO_BATCH=8 (sequences of 128 tokens per step)  LR=2e-3  MIN_LR=2e-4  SEED=1234  EVAL_ITERS=16
#   DATA=data/sotu_text_document  RUNS_DIR=runs/small  CKPT_DIR=checkpoints/small  OUT=results/small
#   ONLY="tiny-1l tiny-1l-2loop"   train/evaluate only these runs (the report still covers every finished run)
# A finished run (summary.json with TRAIN_ITERS iterations) is skipped, and an interrupted one resumes
# from its last checkpoint, so the script can simply be started again. The chosen TRAIN_ITERS is kept
# in $RUNS_DIR/train_iters so a restart uses the same budget.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
cd "$REPO_ROOT"

BUDGET_MINUTES="${BUDGET_MINUTES:-60}"
MICRO_BATCH="${MICRO_BATCH:-8}"
LR="${LR:-2e-3}"
MIN_LR="${MIN_LR:-2e-4}"
SEED="${SEED:-1234}"
EVAL_ITERS="${EVAL_ITERS:-16}"
DATA="${DATA:-data/sotu_text_document}"
RUNS_DIR="${RUNS_DIR:-runs/small}"
CKPT_DIR="${CKPT_DIR:-checkpoints/small}"
OUT="${OUT:-results/small}"
ONLY="${ONLY:-}"

# name  preset  trained-loops  extra trainer flags
RUNS=(
    "tiny-4l              tiny-4l        1"
    "tiny-2l              tiny-2l        1"
    "tiny-2l-2loop        tiny-2l-2loop  2"
    "tiny-2l-2loop-nogate tiny-2l-2loop  2 --loop-gates none"
    "tiny-2l-3loop        tiny-2l-3loop  3"
    "tiny-1l-4loop        tiny-1l-4loop  4"
    "tiny-1l-4loop-nogate tiny-1l-4loop  4 --loop-gates none"
    "tiny-1l              tiny-1l        1"
    "tiny-1l-2loop        tiny-1l-2loop  2"
)
SLOWEST=tiny-2l-3loop   # effective depth 6: the costliest step, used to fit the budget
START=$(date +%s)
mkdir -p "$RUNS_DIR" "$OUT/eval"

if [ ! -f "$DATA.idx" ]; then
    echo "=== preparing the corpus ($DATA) ==="
    "$PYTHON" tools/prepare_sotu.py --out-dir "$(dirname "$DATA")"
fi

COMMON=(--data-path "$DATA" --split 949,50,1 --seq-length 128 --micro-batch-size "$MICRO_BATCH"
        --global-batch-size "$MICRO_BATCH" --lr "$LR" --min-lr "$MIN_LR" --seed "$SEED" --zero-stage 0)

if [ -z "${TRAIN_ITERS:-}" ] && [ -f "$RUNS_DIR/train_iters" ]; then
    TRAIN_ITERS="$(cat "$RUNS_DIR/train_iters")"
    echo "=== reusing TRAIN_ITERS=$TRAIN_ITERS from $RUNS_DIR/train_iters ==="
fi
if [ -z "${TRAIN_ITERS:-}" ]; then
    echo "=== timing $SLOWEST to fit ${#RUNS[@]} runs into $BUDGET_MINUTES minutes ==="
    TRAIN_ITERS="$("$PYTHON" -m loop_megatron.experiments.cli calibrate --budget-minutes "$BUDGET_MINUTES" \
        --runs "${#RUNS[@]}" --reserve-minutes 8 -- --preset "$SLOWEST" "${COMMON[@]}")"
fi
echo "$TRAIN_ITERS" > "$RUNS_DIR/train_iters"
WARMUP=$(( TRAIN_ITERS / 10 > 1 ? TRAIN_ITERS / 10 : 1 ))
EVAL_INTERVAL=$(( TRAIN_ITERS / 10 > 1 ? TRAIN_ITERS / 10 : 1 ))
SAVE_INTERVAL=$(( TRAIN_ITERS / 4 > 1 ? TRAIN_ITERS / 4 : 1 ))
echo "=== $TRAIN_ITERS iterations x $MICRO_BATCH x 128 tokens = $(( TRAIN_ITERS * MICRO_BATCH * 128 )) tokens per run ==="

selected() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }

i=0
for spec in "${RUNS[@]}"; do
    read -r name preset loops extra <<< "$spec"
    i=$((i + 1))
    selected "$name" || continue
    if "$PYTHON" -m loop_megatron.experiments.cli is-complete "$RUNS_DIR/$name" "$TRAIN_ITERS"; then
        echo "=== [$i/${#RUNS[@]}] $name: already trained, skipping ==="
        continue
    fi
    echo "=== [$i/${#RUNS[@]}] training $name ($preset $extra) ==="
    # shellcheck disable=SC2086  # $extra is a list of flags
    "$PYTHON" -m loop_megatron.train --preset "$preset" "${COMMON[@]}" --train-iters "$TRAIN_ITERS" \
        --lr-warmup-iters "$WARMUP" --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS" --log-interval 10 \
        --save "$CKPT_DIR/$name" --load "$CKPT_DIR/$name" --save-interval "$SAVE_INTERVAL" --keep-last 1 \
        --run-dir "$RUNS_DIR/$name" $extra
done

for spec in "${RUNS[@]}"; do
    read -r name preset loops extra <<< "$spec"
    selected "$name" || continue
    [ "$loops" -gt 1 ] || continue
    echo "=== evaluating $name at 1..$((2 * loops)) loops ==="
    "$PYTHON" tools/evaluate.py --load "$CKPT_DIR/$name" --data-path "$DATA" --split 949,50,1 \
        --eval-iters "$EVAL_ITERS" --micro-batch-size "$MICRO_BATCH" --loops $(seq 1 $((2 * loops))) \
        --json "$OUT/eval/$name.json"
done

run_dirs=()
eval_jsons=()
for spec in "${RUNS[@]}"; do
    read -r name _ _ _ <<< "$spec"
    [ -f "$RUNS_DIR/$name/summary.json" ] && run_dirs+=("$RUNS_DIR/$name")
    [ -f "$OUT/eval/$name.json" ] && eval_jsons+=("$OUT/eval/$name.json")
done
echo "=== report ==="
"$PYTHON" tools/plot_runs.py "${run_dirs[@]}" --out "$OUT" ${eval_jsons[@]:+--eval-json "${eval_jsons[@]}"} \
    --title "Small loop experiments: SOTU corpus, $(( TRAIN_ITERS * MICRO_BATCH * 128 )) tokens per run"
echo "=== done in $(( ($(date +%s) - START) / 60 )) min; TensorBoard: tensorboard --logdir $RUNS_DIR ==="
