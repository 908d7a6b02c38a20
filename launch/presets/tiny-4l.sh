#!/usr/bin/env bash
# tiny-4l: CPU: 4 layers, no loop (d=128). Recipe: loop_megatron/config.py; usage: launch/README.md
exec "$(dirname "${BASH_SOURCE[0]}")/../train.sh" --preset tiny-4l "$@"
