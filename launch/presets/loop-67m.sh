#!/usr/bin/env bash
# loop-67m: 4 shared layers x 6 outer loops x 2 inner loops (paper: 67M). Recipe: loop_megatron/config.py; usage: launch/README.md
exec "$(dirname "${BASH_SOURCE[0]}")/../train.sh" --preset loop-67m "$@"
