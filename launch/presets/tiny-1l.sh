#!/usr/bin/env bash
# tiny-1l: CPU: 1 layer, no loop (d=128). Recipe: loop_megatron/config.py; usage: launch/README.md
exec "$(dirname "${BASH_SOURCE[0]}")/../train.sh" --preset tiny-1l "$@"
