#!/usr/bin/env bash
# tiny-2l: CPU: 2 layers, no loop (d=128): same parameters as tiny-2l-*loop
# Usage: launch/presets/tiny-2l.sh [launch/train.sh options] [trainer flags]   (defaults: presets/_common.sh)
PRESET=tiny-2l KIND=tiny
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_preset "$@"
