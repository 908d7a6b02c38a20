#!/usr/bin/env bash
# tiny-2l-2loop: CPU: 2 shared layers x 2 loops (d=128). Recipe: loop_megatron/config.py; usage: launch/README.md
exec "$(dirname "${BASH_SOURCE[0]}")/../train.sh" --preset tiny-2l-2loop "$@"
