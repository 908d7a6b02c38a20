#!/usr/bin/env bash
# tiny-2l-3loop: CPU: 2 shared layers x 3 loops (d=128). Recipe: loop_megatron/config.py; usage: launch/README.md
exec "$(dirname "${BASH_SOURCE[0]}")/../train.sh" --preset tiny-2l-3loop "$@"
