#!/usr/bin/env bash
# lite-45m: 1-layer baseline, no loop (paper: 45M). Recipe: loop_megatron/config.py; usage: launch/README.md
exec "$(dirname "${BASH_SOURCE[0]}")/../train.sh" --preset lite-45m "$@"
