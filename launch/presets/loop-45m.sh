#!/usr/bin/env bash
# loop-45m: 1 shared layer x 2 loops (paper: 45M). Recipe: loop_megatron/config.py; usage: launch/README.md
exec "$(dirname "${BASH_SOURCE[0]}")/../train.sh" --preset loop-45m "$@"
