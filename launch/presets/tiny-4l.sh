#!/usr/bin/env bash
# tiny-4l: CPU: 4 layers, no loop (d=128)
# Usage: launch/presets/tiny-4l.sh [launch/train.sh options] [trainer flags]   (defaults: presets/_common.sh)
PRESET=tiny-4l KIND=tiny
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_preset "$@"
