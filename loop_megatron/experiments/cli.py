"""The command line of the experiment tools::

    python tools/plot_runs.py RUN_DIR [RUN_DIR ...] --out results/mine [--eval-json J ...]

(The "does looping pay?" study has its own driver and report beside the library: studies/looping_pays/.)
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..errors import LoopMegatronError
from .report import write_report


def build_parser(prog: str = "plot_runs.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Loss curves and a results table from training run folders, and a loss-vs-loops "
        "table from tools/evaluate.py --json outputs.",
        epilog="Example: tools/plot_runs.py runs/mine/* --out results/mine --eval-json 'results/mine/eval/*.json'")
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
    args = build_parser(prog).parse_args(argv)
    try:
        written = write_report(args.runs, args.out, args.eval_json, args.baseline, args.smoothing, args.x_axis,
                               args.title)
    except LoopMegatronError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    with open(written["results"], encoding="utf-8") as f:
        print(f.read())
    for key in ("loss_curves", "loss_vs_loops", "results"):
        if key in written:
            print(f"wrote {written[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m loop_megatron.experiments.cli"))
