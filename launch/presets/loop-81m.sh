#!/usr/bin/env bash
# loop-81m: 6 shared layers x 6 loops (paper: 81M)
# Usage: launch/presets/loop-81m.sh [launch/train.sh options] [trainer flags]   (defaults: presets/_common.sh)
PRESET=loop-81m KIND=paper
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_preset "$@"
