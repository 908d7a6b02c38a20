"""Budgeting the small experiments: time a few training steps (`calibrate`), turn the step time into an
iteration count for a time budget (`iterations_for_budget`), and skip runs already done
(`run_is_complete`). Used by `launch/run_small_experiments.sh` through `cli`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

from .records import ExperimentError, _finite, _read_json


def run_is_complete(run_dir: str, train_iters: int) -> bool:
    """True when run_dir/summary.json records at least train_iters iterations."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        return False
    try:
        return int(_read_json(path).get("iterations", -1)) >= train_iters
    except (ExperimentError, TypeError, ValueError, AttributeError):
        return False


def iterations_for_budget(step_time: float, budget_minutes: float, runs: int, startup_seconds: float = 25.0,
                          reserve_minutes: float = 6.0, eval_overhead: float = 0.12, multiple: int = 10,
                          minimum: int = 20) -> int:
    """Training iterations per run so `runs` sequential runs fit in budget_minutes, keeping reserve_minutes
    for evaluation and plots, `startup_seconds` per run and `eval_overhead` of each run for validation."""
    per_run = max(0.0, (budget_minutes - reserve_minutes) * 60.0 / max(1, runs) - startup_seconds)
    iters = int(per_run / (step_time * (1.0 + eval_overhead)))
    return max(minimum, iters // multiple * multiple)


def calibrate(trainer_args: Sequence[str], steps: int = 6, python: Optional[str] = None) -> float:
    """Seconds per training step of `python -m loop_megatron.train TRAINER_ARGS` (mean after the first
    step), measured with a short throw-away run."""
    tmp = tempfile.mkdtemp(prefix="loop_megatron_calibrate_")
    try:
        cmd = [python or sys.executable, "-m", "loop_megatron.train", *trainer_args, "--train-iters", str(steps),
               "--lr-warmup-iters", "1", "--eval-iters", "0", "--eval-interval", "0", "--log-interval", str(steps),
               "--run-dir", os.path.join(tmp, "run"), "--save", "", "--load", ""]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        summary_path = os.path.join(tmp, "run", "summary.json")
        if proc.returncode != 0 or not os.path.isfile(summary_path):
            raise ExperimentError(f"calibration run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
        step_time = _finite(_read_json(summary_path).get("step_time"))
        if not step_time:
            raise ExperimentError("calibration run wrote no step time in summary.json.")
        return step_time
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
