"""The results report of a set of runs: loss_curves.png and results.md, plus loss_vs_loops.{png,md} when
`tools/evaluate.py --json` files are given (what `tools/plot_runs.py` writes)."""
from __future__ import annotations

import glob
import os
from typing import Dict, Optional, Sequence

from ..utils import fs
from .plots import plot_loss_curves, plot_loss_vs_loops
from .records import ExperimentError, load_eval_json, load_runs
from .tables import baseline_run, loops_markdown, results_markdown


def write_report(run_patterns: Sequence[str], out_dir: str, eval_jsons: Sequence[str] = (),
                 baseline: Optional[str] = None, smoothing: float = 0.6, x_axis: str = "iteration",
                 title: str = "Results") -> Dict[str, str]:
    """Write loss_curves.png + results.md (and loss_vs_loops.{png,md} with eval JSONs) into out_dir."""
    written: Dict[str, str] = {}
    sections = [f"# {title}", ""]
    runs = load_runs(run_patterns) if run_patterns else []
    if runs:
        written["loss_curves"] = plot_loss_curves(runs, os.path.join(out_dir, "loss_curves.png"), smoothing, x_axis)
        base = baseline_run(runs, baseline)
        sections += ["## Training runs", "", results_markdown(runs, base), "",
                     f"Step time is relative to {base.name}. Final train loss is the mean over the last logging "
                     f"window; final valid loss is the last evaluation.", "", "![loss curves](loss_curves.png)", ""]
    eval_files = []
    for pattern in eval_jsons:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        eval_files.extend(matches)
    if eval_files:
        evals = [load_eval_json(p) for p in eval_files]
        table = loops_markdown(evals)
        written["loss_vs_loops"] = plot_loss_vs_loops(evals, os.path.join(out_dir, "loss_vs_loops.png"))
        fs.write_text(os.path.join(out_dir, "loss_vs_loops.md"), "# Loss vs. loops\n\n" + table + "\n",
                      make_parent=True)
        written["loss_vs_loops_md"] = os.path.join(out_dir, "loss_vs_loops.md")
        sections += ["## Loss vs. loop count at evaluation", "", table, "", "![loss vs loops](loss_vs_loops.png)", ""]
    if not runs and not eval_files:
        raise ExperimentError("nothing to report: give run folders and/or --eval-json files.")
    fs.write_text(os.path.join(out_dir, "results.md"), "\n".join(sections), make_parent=True)
    written["results"] = os.path.join(out_dir, "results.md")
    return written
