#!/usr/bin/env bash
# tiny-1l: CPU: 1 layer, no loop (d=128)
# Usage: launch/presets/tiny-1l.sh [launch/train.sh options] [trainer flags]   (defaults: presets/_common.sh)
PRESET=tiny-1l KIND=tiny
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_preset "$@"
