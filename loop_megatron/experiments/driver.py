"""Running a study's training and evaluation processes, resumably (public, for the studies in studies/).

A study is a client of the package's command lines: every training run is `python -m loop_megatron.train`
and every evaluation `tools/*.py`, each in its own subprocess, so that a run's failure, memory and global
state stay in that process, its log is the process's output, and a study resumes by looking at what the
finished processes left on disk. `StudyDriver` holds that machinery, shared by every study:

* `run(cmd, log)`: one subprocess, its output appended to a log file, progress lines echoed;
* `is_trained(name, iters, lr)`: a run counts as done when its summary says it reached `iters` and its
  checkpoint exists; a run made with another learning rate is refused (the study changed under it);
* `train(name, cmd, iters, lr, label)`: run the trainer unless done (a run interrupted before its first
  checkpoint starts again from step 0, its old records removed);
* `once(out, cmd, log)`: run a command that writes `out` unless `out` exists (evaluations);
* `alias(source, target)`: the same run under a second name (a sweep's run reused as a seed's run);
* `sweep_learning_rates(arms, grid, ...)`: one grid of peak LRs for every arm, each arm's LR chosen on its
  own validation scores, the sweep kept in a JSON file that a later partial run adds to.
* `train_plan(arms, seeds, lrs, iters)`: every arm x seed, seed-major (an interrupted study has every arm
  at the first seeds), the first seed's sweep run reused, each trained (`train_arm`) and evaluated
  (`evaluate_run`), the two steps a study defines.

`run_name` / `lr_run_name` name the runs; `add_study_arguments`, `apply_study_arguments` and `run_study_main`
are the command line both studies share (study_cli.py).

`StudyArm` is one configuration of a study's grid (both studies' arms).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import LoopMegatronError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The checkout the package lives in: subprocesses run there (tools/ and studies/ resolve from it)."""


def run_name(arm: str, seed: int) -> str:
    """The run folder name of an arm's seed: '1L-s2'."""
    return f"{arm}-s{seed}"


def lr_run_name(arm: str, seed: int, lr: float) -> str:
    """The run folder name of a learning-rate sweep point: 'lr0.001-1L-s1'."""
    return f"lr{lr:g}-{run_name(arm, seed)}"


class StudyError(LoopMegatronError):
    """A step of a study failed; the message names its log file."""


@dataclasses.dataclass(frozen=True)
class StudyArm:
    """One configuration of a study's grid."""

    name: str
    """Short name used for folders, tables and legends."""
    preset: str
    """Trainer preset (loop_megatron/config.py PRESETS) it starts from."""
    family: str
    """The role the study's comparisons and claims give it (e.g. 'unshared', 'looped'; 'k x 1', 'k x L')."""
    description: str
    """One line for the tables."""
    overrides: Tuple[str, ...] = ()
    """Config overrides (SECTION.FIELD=VALUE) on top of the preset and the study's common settings."""
    sweep_loops: Tuple[int, ...] = ()
    """Inference loop counts the checkpoint is also evaluated at (empty: the trained depth only)."""
    exit_thresholds: Tuple[float, ...] = ()
    """KL thresholds (nats) of an adaptive-exit evaluation (empty: none)."""
    exit_max_loops: int = 0
    """Loop cap of the adaptive-exit evaluation; 0 = the largest of sweep_loops."""


class StudyDriver:
    """Subprocess runs of one study, with run folders under `runs_dir` and checkpoints under `ckpt_dir`."""

    def __init__(self, runs_dir: str, ckpt_dir: str, python: Optional[str] = None,
                 log: Callable[[str], None] = print):
        self.runs_root = runs_dir
        self.ckpt_root = ckpt_dir
        self.python = python or sys.executable
        self.log = log
        self.repo = REPO_ROOT
        self.started = time.time()

    def elapsed(self) -> str:
        m, s = divmod(int(time.time() - self.started), 60)
        return f"{m}:{s:02d}"

    def tool(self, name: str) -> List[str]:
        """The command prefix of tools/NAME."""
        return [self.python, os.path.join(self.repo, "tools", name)]

    def run_dir(self, name: str) -> str:
        return os.path.join(self.runs_root, name)

    def ckpt_dir(self, name: str) -> str:
        return os.path.join(self.ckpt_root, name)

    def run(self, cmd: List[str], log_path: str, echo_prefix: str = "") -> None:
        """Run cmd, its output appended to log_path; progress lines ('iter N/M | loss ...') are echoed
        with echo_prefix when one is given. StudyError naming the log when it fails."""
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as log_file:
            log_file.write("$ " + " ".join(cmd) + "\n")
            log_file.flush()
            # Unbuffered children: their progress lines reach the log (and the console) as they are printed.
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    cwd=self.repo, bufsize=1, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            for line in proc.stdout:
                log_file.write(line)
                log_file.flush()
                if echo_prefix and line.startswith("iter ") and "| loss" in line:
                    self.log(f"  {echo_prefix} {line.rstrip()}")
            code = proc.wait()
        if code != 0:
            raise StudyError(f"{' '.join(cmd[:4])} ... failed (exit {code}); see {log_path}.")

    def is_trained(self, name: str, iters: int, lr: Optional[float] = None) -> bool:
        """True when run `name` finished `iters` steps and left its checkpoint; StudyError when it was made
        with another LR than `lr` (its records would silently mix two settings)."""
        run = self.run_dir(name)
        config = os.path.join(run, "config.yaml")
        if lr is not None and os.path.isfile(config):
            from .records import read_yaml

            used = (read_yaml(config).get("training") or {}).get("lr")
            if used is not None and abs(float(used) - lr) > 1e-12 * lr:
                raise StudyError(f"{run} was trained with lr {float(used):g} but the study now uses {lr:g}; "
                                 f"delete {run} and {self.ckpt_dir(name)} (or the whole study folders) and start again.")
        path = os.path.join(run, "summary.json")
        if not os.path.isfile(path) or not os.path.isfile(os.path.join(self.ckpt_dir(name), "latest")):
            return False
        with open(path, encoding="utf-8") as f:
            return int(json.load(f).get("iterations") or 0) >= iters

    def train(self, name: str, cmd: List[str], iters: int, lr: Optional[float], label: str,
              describe: str = "") -> None:
        """Run the trainer command `cmd` for run `name` unless it is trained already."""
        if self.is_trained(name, iters, lr):
            self.log(f"{label} {name}: trained already")
            return
        if os.path.isdir(self.run_dir(name)) and not os.path.isfile(os.path.join(self.ckpt_dir(name), "latest")):
            # Interrupted before its first checkpoint: it starts again from step 0, so its old records go
            # (metrics.jsonl would otherwise hold the first steps twice).
            shutil.rmtree(self.run_dir(name))
        t0 = time.time()
        self.log(f"{label} {name}: training ({describe})  [study {self.elapsed()}]")
        self.run(cmd, os.path.join(self.run_dir(name), "train.log"), echo_prefix=name)
        self.log(f"{label} {name}: done in {time.time() - t0:.0f} s")

    def once(self, out: str, cmd: Sequence[str], log_path: str) -> str:
        """Run `cmd` (which writes `out`) unless `out` exists; return `out`."""
        if not os.path.isfile(out):
            os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
            self.run(list(cmd), log_path)
        return out

    def alias(self, source: str, target: str, files: Sequence[tuple] = ()) -> None:
        """Point target's run and checkpoint folders at source's (the same run under a second name), and
        copy each (source file, target file) of `files` that exists (e.g. its evaluation JSON)."""
        for root in (self.runs_root, self.ckpt_root):
            dst = os.path.join(root, target)
            if not os.path.lexists(dst):
                os.makedirs(root, exist_ok=True)
                os.symlink(source, dst)
        from ..utils.fs import write_json

        for src, dst in files:
            if os.path.isfile(src) and not os.path.exists(dst):
                with open(src, encoding="utf-8") as f:
                    write_json(dst, json.load(f), make_parent=True)

    # A study defines these three: train one arm x seed at an LR under a run name, evaluate a trained run,
    # and where an evaluation of a kind is written.
    def train_arm(self, arm: StudyArm, seed: int, lr: float, name: str, label: str) -> None:
        raise NotImplementedError

    def evaluate_run(self, arm: StudyArm, name: str) -> None:
        raise NotImplementedError

    def eval_path(self, name: str, kind: str) -> str:
        raise NotImplementedError

    def train_plan(self, arms: Sequence[StudyArm], seeds: Sequence[int], lrs: Dict[str, float], iters: int) -> None:
        """Train and evaluate every arm x seed at its arm's LR, seed-major; the first seed's run at the chosen
        LR is its sweep's run (same arm, seed and LR), reused under the seed's name with its valid evaluation."""
        plan = [(arm, seed) for seed in seeds for arm in arms]
        for k, (arm, seed) in enumerate(plan):
            name, lr = run_name(arm.name, seed), lrs[arm.name]
            sweep_run = lr_run_name(arm.name, seed, lr)
            if seed == seeds[0] and self.is_trained(sweep_run, iters, lr):
                self.alias(sweep_run, name, [(self.eval_path(sweep_run, "valid"), self.eval_path(name, "valid"))])
            self.train_arm(arm, seed, lr, name, f"[{k + 1}/{len(plan)}]")
            self.evaluate_run(arm, name)

    def sweep_learning_rates(self, arms: Sequence[StudyArm], grid: Sequence[float], path: str,
                             run_point: Callable[[StudyArm, float], Dict[str, Any]],
                             pick: Callable[[List[Dict[str, Any]]], Dict[str, Any]],
                             score: Callable[[Dict[str, Any]], str], header: Dict[str, Any]) -> Dict[str, float]:
        """One grid of peak learning rates for every arm of `arms`, each arm's LR chosen on its own rows.

        `run_point(arm, lr)` trains and evaluates one point (on the validation split only) and returns its row
        (``{"lr": lr, "run": name, ...scores}``); `pick(rows)` is the chosen row; `score(row)` its score for the
        log. `path` (a JSON file: `header`, the grid, and per arm its rows and chosen LR) keeps the arms swept
        earlier on the same grid, so a study run on some arms adds to it, and a changed grid sweeps again.
        Returns {arm name: chosen LR} for every arm in the file after this sweep."""
        earlier: Dict[str, Any] = {}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                earlier = json.load(f).get("arms", {})
        sweep = {a: e for a, e in earlier.items() if [r["lr"] for r in e["rows"]] == list(grid)}
        for arm in arms:
            rows = [run_point(arm, lr) for lr in grid]
            best = pick(rows)
            sweep[arm.name] = {"rows": rows, "chosen_lr": best["lr"],
                               "at_grid_edge": len(grid) > 1 and best["lr"] in (min(grid), max(grid))}
            self.log(f"[lr] {arm.name}: " + ", ".join(f"{r['lr']:g}: {score(r)}" for r in rows)
                     + f" -> {best['lr']:g}" + ("  (at the edge of the grid)" if sweep[arm.name]["at_grid_edge"] else ""))
        from ..utils.fs import write_json

        write_json(path, dict(header, grid=list(grid), arms=sweep), make_parent=True)
        return {a: e["chosen_lr"] for a, e in sweep.items()}

