#!/usr/bin/env bash
# recurrent-97m: Recurrent depth at GPT-2-small width: 2 prelude + 4 core x ~8 loops (sampled, max 16, backprop 4) + 2 coda, linear injection, random s_0. Recipe: loop_megatron/config.py; usage: launch/README.md
exec "$(dirname "${BASH_SOURCE[0]}")/../train.sh" --preset recurrent-97m "$@"
