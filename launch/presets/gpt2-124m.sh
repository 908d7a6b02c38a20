#!/usr/bin/env bash
# gpt2-124m: GPT-2 small baseline: 12 layers, no loop (paper: 124M). Recipe: loop_megatron/config.py; usage: launch/README.md
exec "$(dirname "${BASH_SOURCE[0]}")/../train.sh" --preset gpt2-124m "$@"
