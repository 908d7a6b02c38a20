#!/usr/bin/env bash
# tiny-2l-3loop: CPU: 2 shared layers x 3 loops (d=128)
# Usage: launch/presets/tiny-2l-3loop.sh [launch/train.sh options] [trainer flags]   (defaults: presets/_common.sh)
PRESET=tiny-2l-3loop KIND=tiny
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_preset "$@"
