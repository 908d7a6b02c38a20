#!/usr/bin/env bash
# tiny-recurrent: CPU recurrent depth: 1 prelude + 2 core x ~4 loops (sampled, max 8, backprop 2) + 1 coda, linear injection, random s_0 (d=128). Recipe: loop_megatron/config.py; usage: launch/README.md
exec "$(dirname "${BASH_SOURCE[0]}")/../train.sh" --preset tiny-recurrent "$@"
