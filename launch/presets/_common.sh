# Sourced by launch/presets/*.sh. Each preset script sets PRESET and KIND (paper|tiny), then calls
# run_preset "$@". Defaults below can be changed through the environment; arguments given to the preset
# script come after the defaults, so they win (the trainer keeps the last value of a repeated flag).
#
# paper presets (GPT-2-small width, OpenWebText, nanoGPT recipe):
#   DATA=data/openwebtext/openwebtext_text_document  SEQ_LENGTH=1024  MICRO_BATCH=12  GLOBAL_BATCH=480
#   TRAIN_ITERS=600000  LR=6e-4  MIN_LR=6e-5  WARMUP_ITERS=2000  ZERO_STAGE=1  PRECISION=bf16
# tiny presets (CPU, State-of-the-Union corpus, prepared on first use):
#   DATA=data/sotu_text_document  MICRO_BATCH=8  TRAIN_ITERS=200  LR=1e-3
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../_python.sh"

run_preset() {
    local defaults
    if [ "$KIND" = paper ]; then
        DATA="${DATA:-data/openwebtext/openwebtext_text_document}"
        defaults=(--data-path "$DATA" --split 949,50,1 --seq-length "${SEQ_LENGTH:-1024}"
                  --micro-batch-size "${MICRO_BATCH:-12}" --global-batch-size "${GLOBAL_BATCH:-480}"
                  --train-iters "${TRAIN_ITERS:-600000}" --lr "${LR:-6e-4}" --min-lr "${MIN_LR:-6e-5}"
                  --lr-warmup-iters "${WARMUP_ITERS:-2000}" --precision "${PRECISION:-bf16}"
                  --zero-stage "${ZERO_STAGE:-1}" --save "checkpoints/$PRESET" --load "checkpoints/$PRESET"
                  --save-interval 5000 --eval-interval 1000 --eval-iters 100 --log-interval 10
                  --run-dir "runs/$PRESET")
        if [ ! -f "$DATA.idx" ]; then
            echo "note: $DATA.idx not found; prepare OpenWebText with tools/preprocess_data.py (see launch/README.md)" >&2
        fi
    else
        DATA="${DATA:-data/sotu_text_document}"
        if [ ! -f "$DATA.idx" ]; then
            "$PYTHON" "$REPO_ROOT/tools/prepare_sotu.py" --out-dir "$(dirname "$DATA")"
        fi
        defaults=(--data-path "$DATA" --split 949,50,1 --micro-batch-size "${MICRO_BATCH:-8}"
                  --train-iters "${TRAIN_ITERS:-200}" --lr "${LR:-1e-3}" --min-lr "${MIN_LR:-1e-4}"
                  --lr-warmup-iters "${WARMUP_ITERS:-20}" --eval-interval 50 --eval-iters 5 --log-interval 10
                  --save "checkpoints/$PRESET" --run-dir "runs/$PRESET")
    fi
    exec "$LAUNCH_DIR/train.sh" --preset "$PRESET" "${defaults[@]}" "$@"
}
