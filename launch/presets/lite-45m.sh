#!/usr/bin/env bash
# lite-45m: 1-layer baseline, no loop (paper: 45M)
# Usage: launch/presets/lite-45m.sh [launch/train.sh options] [trainer flags]   (defaults: presets/_common.sh)
PRESET=lite-45m KIND=paper
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_preset "$@"
