#!/usr/bin/env bash
# tiny-1l-2loop: CPU: 1 shared layer x 2 loops (d=128). Recipe: loop_megatron/config.py; usage: launch/README.md
exec "$(dirname "${BASH_SOURCE[0]}")/../train.sh" --preset tiny-1l-2loop "$@"
