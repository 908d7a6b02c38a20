"""The command line every study shares (`python -m studies.NAME.study`): which arms, seeds and folders,
quick or full, report only, the README block; and one way to end (an error in one sentence, exit 1; an
unknown arm, exit 2; Ctrl-C, exit 130 with how to go on).

A study adds its own flags (the LM study's --tokens, the reasoning study's --loops/--set/--override) to the
parser `add_study_arguments` fills, and names its defaults in `defaults` so that each help line says them.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, Sequence

from ..errors import LoopMegatronError

FOLDERS = (("out", "out_dir", "results folder"), ("runs_dir", "runs_dir", "run folders"),
           ("ckpt_dir", "ckpt_dir", "checkpoints"), ("data_dir", "data_dir", "data: corpus or task files, and their datasets"))
"""(argparse dest, settings field, what it holds) of the folder flags."""


def add_study_arguments(p: argparse.ArgumentParser, arm_names: Sequence[str], quick_help: str,
                        defaults: Dict[str, str], block: str) -> None:
    """--quick, --only, --seeds, the four folders, --report-only and --readme on `p`. `defaults` maps
    'seeds' and each folder dest to the words its help line gives as the default; `block` is the README
    marker name ('study' for '<!-- study:begin -->')."""
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--only", nargs="+", default=[], metavar="ARM",
                   help=f"train and evaluate only these arms (of {', '.join(arm_names)}); the report covers "
                        "every finished run")
    p.add_argument("--seeds", type=int, nargs="+", help=f"seeds (default {defaults['seeds']})")
    for dest, _, what in FOLDERS:
        p.add_argument("--" + dest.replace("_", "-"), dest=dest, help=f"{what} (default {defaults[dest]})")
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables and plots from disk")
    p.add_argument("--readme", metavar="README.md",
                   help=f"also replace the README block between '<!-- {block}:begin -->' and '<!-- {block}:end -->' "
                        "with the generated tables and figures")


def apply_study_arguments(args: argparse.Namespace, settings) -> None:
    """--seeds and the folder flags onto `settings` (a study's settings dataclass)."""
    if args.seeds:
        settings.seeds = tuple(args.seeds)
    for dest, field, _ in FOLDERS:
        if getattr(args, dest):
            setattr(settings, field, getattr(args, dest))


def run_study_main(run: Callable[[], object], only: Sequence[str], arm_names: Sequence[str]) -> int:
    """Check --only against the arms, then `run()`; the exit status of the study's command line."""
    unknown = [a for a in only if a not in set(arm_names)]
    if unknown:
        print(f"study: error: --only {' '.join(unknown)}: unknown arm (known: {', '.join(arm_names)}).",
              file=sys.stderr)
        return 2
    try:
        run()
    except LoopMegatronError as exc:  # a failed step (StudyError) or unreadable records (ExperimentError)
        print(f"study: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("study: interrupted; start it again to go on where it stopped", file=sys.stderr)
        return 130
    return 0
