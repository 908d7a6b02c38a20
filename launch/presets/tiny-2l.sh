#!/usr/bin/env bash
# tiny-2l: CPU: 2 layers, no loop (d=128): same parameters as tiny-2l-*loop. Recipe: loop_megatron/config.py; usage: launch/README.md
exec "$(dirname "${BASH_SOURCE[0]}")/../train.sh" --preset tiny-2l "$@"
