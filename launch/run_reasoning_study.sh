#!/usr/bin/env bash
# "Where looping pays: reasoning tasks": the CPU-scale pointer-chasing study behind the README's reasoning section
# (`make reasoning`; studies/reasoning/study.py says every step):
#
#   1L     k x 1: one layer                    1Lx4   k x L: that layer looped 4 times
#   4L     kL x 1: four unshared layers        rec    recurrent depth on the one layer (~4 sampled loops)
#
# pointer chasing (12 positions, trained on 2 and 3 hops, tested on 1-8 hops), answer-masked loss, the LR
# chosen per arm on the validation split, 3 seeds x 1,500 steps; then tables and figures in
# results/reasoning/ and the README block between '<!-- reasoning:begin -->' and '<!-- reasoning:end -->'.
# An interrupted study resumes where it stopped.
#
#   QUICK=1         the smoke run: 1 seed, 1 LR, 300 steps, into runs/reasoning-quick and
#                   results/reasoning-quick (README untouched)
#   REPORT_ONLY=1   rebuild the tables, figures and README block from the records in results/reasoning
#                   (what a fresh clone has)
#   ONLY="1L rec"   train/evaluate only these arms (the report covers every finished run)
# Further flags go to the study (python -m studies.reasoning.study --help).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
cd "$REPO_ROOT"

source "$(dirname "${BASH_SOURCE[0]}")/_study.sh"
args=("${STUDY_ARGS[@]}")
if [ "${REPORT_ONLY:-0}" = 1 ]; then
    args+=(--report-only)
fi
exec "$PYTHON" -m studies.reasoning.study "${args[@]}" "$@"
