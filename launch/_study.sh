# Sourced by the study launch scripts (run_small_experiments.sh, run_reasoning_study.sh): the arguments
# both studies take from the environment, in STUDY_ARGS.
#   QUICK=1        the smoke run (--quick; the README is left untouched), else --readme README.md
#   ONLY="A B"     train/evaluate only these arms (--only A B)
STUDY_ARGS=()
if [ "${QUICK:-0}" = 1 ]; then
    STUDY_ARGS+=(--quick)
else
    STUDY_ARGS+=(--readme README.md)
fi
if [ -n "${ONLY:-}" ]; then
    # shellcheck disable=SC2206  # a list of arm names
    STUDY_ARGS+=(--only $ONLY)
fi
