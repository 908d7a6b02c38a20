#!/usr/bin/env bash
# loop-81m: 6 shared layers x 6 loops (paper: 81M). Recipe: loop_megatron/config.py; usage: launch/README.md
exec "$(dirname "${BASH_SOURCE[0]}")/../train.sh" --preset loop-81m "$@"
