#!/usr/bin/env bash
# loop-67m: 4 shared layers x 6 outer loops x 2 inner loops (paper: 67M)
# Usage: launch/presets/loop-67m.sh [launch/train.sh options] [trainer flags]   (defaults: presets/_common.sh)
PRESET=loop-67m KIND=paper
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_preset "$@"
