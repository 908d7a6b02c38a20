#!/usr/bin/env bash
# "Does looping pay?": the CPU-scale study behind the README's Results section (`make experiments`).
# A seeded grid on the five-source corpus with its own 2,048-token BPE, reported in bits per byte on
# each source's held-out documents (studies/looping_pays/study.py says every step):
#
#   1L, 1Lx2, 1Lx4, 2L, 2Lx2, 4L     unshared and looped GPT-2s, d=128
#   rec                              recurrent depth: prelude 1 + core 1 x ~4 sampled loops, injection,
#                                    truncated backprop (the 2-layer model's unique parameters)
#   1Lx4-prog                        progressive looping, 1 -> 4 loops over the first half
#
# 3 seeds x 2.5M tokens each, LR chosen on the validation split for 1L; 110 minutes measured on 2 cores.
# Then the tables and figures are written to results/study/ and into README.md between the
# '<!-- study:begin -->' / '<!-- study:end -->' markers. An interrupted study resumes where it stopped.
#
#   QUICK=1   the smoke run: 200K tokens, 2 seeds, 1 LR for every arm, into runs/study-quick and results/study-quick
#             (README untouched; under 15 minutes)
#   ONLY="1L rec"   train/evaluate only these arms (the report covers every finished run)
# Further flags go to the study (python -m studies.looping_pays.study --help).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
cd "$REPO_ROOT"

source "$(dirname "${BASH_SOURCE[0]}")/_study.sh"
args=("${STUDY_ARGS[@]}")
exec "$PYTHON" -m studies.looping_pays.study "${args[@]}" "$@"
