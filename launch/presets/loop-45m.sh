#!/usr/bin/env bash
# loop-45m: 1 shared layer x 2 loops (paper: 45M)
# Usage: launch/presets/loop-45m.sh [launch/train.sh options] [trainer flags]   (defaults: presets/_common.sh)
PRESET=loop-45m KIND=paper
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_preset "$@"
