#!/usr/bin/env bash
# gpt2-124m: GPT-2 small baseline: 12 layers, no loop (paper: 124M)
# Usage: launch/presets/gpt2-124m.sh [launch/train.sh options] [trainer flags]   (defaults: presets/_common.sh)
PRESET=gpt2-124m KIND=paper
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_preset "$@"
