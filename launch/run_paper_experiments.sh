#!/usr/bin/env bash
# The paper's five GPT-2-small-width runs (Ng & Wang, arXiv 2409.14199) on OpenWebText, one after another.
#
#   launch/run_paper_experiments.sh --dry-run [--nodes N --gpus-per-node G] [--hostfile F]
#   launch/run_paper_experiments.sh --hostfile F [--nodes N] [--gpus-per-node G] [--presets loop-81m ...]
#
# --dry-run prints, for gpt2-124m, loop-81m, loop-67m, lite-45m and loop-45m: parameters, FLOPs per
# token, model-state memory per GPU under ZeRO 0/1/2/3 at that node/GPU count (DeepSpeed's own
# estimators for ZeRO-2/3, stated formulas for 0/1), and the exact deepspeed command of each run.
# Without --dry-run the runs start on the hostfile's nodes through DeepSpeed's ssh/pdsh launcher
# (for clusters without ssh, run launch/presets/<name>.sh on every node with --no-ssh --node-rank R).
#
# Hyper-parameters: the paper presets' recipe (loop_megatron/config.py paper_recipe: nanoGPT's GPT-2-small
# recipe, which the paper follows), each changeable by an environment variable (DATA: alias of OWT_DATA):
#   OWT_DATA=data/openwebtext/openwebtext_text_document   (prepare: see launch/README.md)
#   SEQ_LENGTH=1024  MICRO_BATCH=12  GLOBAL_BATCH=<480..512, a multiple of micro x ranks>  TRAIN_ITERS=600000
#   LR=6e-4  MIN_LR=6e-5  WARMUP_ITERS=2000  PRECISION=bf16  ZERO_STAGE=1  ACT_CKPT=none
#   SAVE_ROOT=checkpoints/paper  RUN_ROOT=runs/paper  SAVE_INTERVAL=5000  EVAL_INTERVAL=1000  EVAL_ITERS=100
# Runs resume from SAVE_ROOT/<preset> when a checkpoint is there. Extra trainer flags can follow.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
exec "$PYTHON" -m loop_megatron.launch.cli paper "$@"
