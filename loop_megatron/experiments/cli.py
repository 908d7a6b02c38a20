"""The command line of the experiment tools::

    python tools/plot_runs.py RUN_DIR [RUN_DIR ...] --out results/small [--eval-json J ...]   (main)
    python -m loop_megatron.experiments.cli calibrate --budget-minutes M --runs N [-- trainer args]
    python -m loop_megatron.experiments.cli is-complete RUN_DIR TRAIN_ITERS                  (exit 0/1)

The last two are what `launch/run_small_experiments.sh` calls.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .budget import calibrate, iterations_for_budget, run_is_complete
from .records import ExperimentError
from .report import write_report


def build_parser(prog: str = "plot_runs.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Loss curves and a results table from training run folders, and a loss-vs-loops "
        "table from tools/evaluate.py --json outputs.",
        epilog="Example: tools/plot_runs.py runs/small/* --out results/small --eval-json 'results/small/eval/*.json'")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR",
                   help="run folders (config.yaml, summary.json, tensorboard/) or glob patterns; a folder of run "
                        "folders stands for all of them")
    p.add_argument("--out", required=True, help="output folder for loss_curves.png, results.md, loss_vs_loops.*")
    p.add_argument("--eval-json", nargs="+", default=[], metavar="JSON",
                   help="tools/evaluate.py --json files (or glob patterns) for the loss-vs-loops table and plot")
    p.add_argument("--baseline", help="run/preset name step times are relative to (default tiny-1l, else the first run)")
    p.add_argument("--smoothing", type=float, default=0.6, help="EMA weight for the train-loss curves (0 = raw)")
    p.add_argument("--x-axis", choices=("iteration", "tokens"), default="iteration")
    p.add_argument("--title", default="Results", help="heading of results.md")
    return p


def main(argv: Optional[Sequence[str]] = None, prog: str = "plot_runs.py") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "calibrate":
        return _main_calibrate(argv[1:])
    if argv and argv[0] == "is-complete":
        return 0 if run_is_complete(argv[1], int(argv[2])) else 1
    args = build_parser(prog).parse_args(argv)
    try:
        written = write_report(args.runs, args.out, args.eval_json, args.baseline, args.smoothing, args.x_axis,
                               args.title)
    except ExperimentError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    with open(written["results"], encoding="utf-8") as f:
        print(f.read())
    for key in ("loss_curves", "loss_vs_loops", "results"):
        if key in written:
            print(f"wrote {written[key]}")
    return 0


def _main_calibrate(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m loop_megatron.experiments.cli calibrate",
                                description="Print the training iterations per run that fit a time budget.")
    p.add_argument("--budget-minutes", type=float, required=True)
    p.add_argument("--runs", type=int, required=True, help="runs sharing the budget")
    p.add_argument("--reserve-minutes", type=float, default=6.0, help="kept for evaluation and plots")
    p.add_argument("--steps", type=int, default=6, help="steps of the timing run")
    args, trainer_args = p.parse_known_args(argv)
    if trainer_args and trainer_args[0] == "--":
        trainer_args = trainer_args[1:]
    try:
        step_time = calibrate(trainer_args, args.steps)
    except ExperimentError as exc:
        print(f"calibrate: error: {exc}", file=sys.stderr)
        return 2
    iters = iterations_for_budget(step_time, args.budget_minutes, args.runs, reserve_minutes=args.reserve_minutes)
    print(f"calibrate: {step_time:.2f} s/step -> {iters} iterations per run for {args.runs} runs in "
          f"{args.budget_minutes:g} min", file=sys.stderr)
    print(iters)
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m loop_megatron.experiments.cli"))
