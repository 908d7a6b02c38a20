#!/usr/bin/env bash
# tiny-1l-2loop: CPU: 1 shared layer x 2 loops (d=128)
# Usage: launch/presets/tiny-1l-2loop.sh [launch/train.sh options] [trainer flags]   (defaults: presets/_common.sh)
PRESET=tiny-1l-2loop KIND=tiny
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_preset "$@"
