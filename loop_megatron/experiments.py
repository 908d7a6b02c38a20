"""Reading training runs back: loss curves, a results table, and loss versus loop count.

A run folder is what `python -m loop_megatron.train --run-dir DIR` leaves behind: `config.yaml` (the
resolved config), `summary.json` (params, depth, tokens seen, final losses, speed) and TensorBoard event
files under `tensorboard/` (scalars `train/loss`, `valid/loss`, ... against the iteration). This module

* loads runs (`load_run`, `load_runs`; TensorBoard through `EventAccumulator`),
* plots train and valid loss curves side by side, one line per run (`plot_loss_curves`),
* writes the Markdown results table (`results_markdown`),
* turns `tools/evaluate.py --json` outputs into a loss-versus-loops table and plot
  (`load_eval_json`, `loops_markdown`, `plot_loss_vs_loops`),
* times a few training steps to choose an iteration count for a time budget (`calibrate`), used by
  `launch/run_small_experiments.sh`.

Front end: `tools/plot_runs.py RUN_DIR [RUN_DIR ...] --out results/small [--eval-json J ...]`.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

Series = List[Tuple[int, float]]


class ExperimentError(ValueError):
    """A run folder or results file that cannot be read; the message names it."""


# ----------------------------------------------------------------------------------------------------
# Loading runs
# ----------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One training run folder, read back."""

    path: str
    name: str
    config: Dict[str, Any] = field(default_factory=dict)
    summary: Dict[str, Any] = field(default_factory=dict)
    scalars: Dict[str, Series] = field(default_factory=dict)

    def _model(self, key: str, default: Any = None) -> Any:
        return (self.config.get("model") or {}).get(key, default)

    @property
    def preset(self) -> Optional[str]:
        return self.summary.get("preset") or self.config.get("preset")

    @property
    def num_layers(self) -> Optional[int]:
        return self.summary.get("num_layers", self._model("num_layers"))

    @property
    def unique_layers(self) -> Optional[int]:
        layers = self.num_layers
        if layers is None:
            return None
        return layers + int(self._model("prelude_layers", 0) or 0) + int(self._model("coda_layers", 0) or 0)

    @property
    def num_loops(self) -> int:
        return int(self.summary.get("num_loops", self._model("num_loops", 1)) or 1)

    @property
    def inner_loops(self) -> int:
        return int(self.summary.get("inner_loops", self._model("inner_loops", 1)) or 1)

    @property
    def gates(self) -> str:
        return str(self._model("loop_gates", "?"))

    @property
    def effective_depth(self) -> Optional[int]:
        if "effective_depth" in self.summary:
            return self.summary["effective_depth"]
        if self.num_layers is None:
            return None
        return (int(self._model("prelude_layers", 0) or 0) + self.num_loops * self.num_layers * self.inner_loops
                + int(self._model("coda_layers", 0) or 0))

    @property
    def params(self) -> Optional[int]:
        if self.summary.get("params") is not None:
            return int(self.summary["params"])
        if self.config.get("model"):
            try:
                from .config import Config
                from .model.stats import parameter_count

                return int(parameter_count(Config.from_dict({"model": self.config["model"]}).model))
            except Exception:
                return None
        return None

    @property
    def shape(self) -> str:
        """'2L x 2 loops', '4L x 6 loops x 2 inner', '4L' (no loop)."""
        layers = self.unique_layers
        text = f"{layers if layers is not None else '?'}L"
        if self.num_loops > 1 or self.inner_loops > 1:
            text += f" x {self.num_loops} loop{'s' if self.num_loops > 1 else ''}"
        if self.inner_loops > 1:
            text += f" x {self.inner_loops} inner"
        return text

    @property
    def label(self) -> str:
        """Legend text: name, layers x loops (x inner), gates (looped models), parameter count."""
        parts = [self.shape]
        if self.num_loops > 1 or self.inner_loops > 1:
            parts.append("no gates" if self.gates == "none" else f"{self.gates} gates")
        if self.params is not None:
            parts.append(format_params(self.params))
        return f"{self.name}: " + ", ".join(parts)

    def last(self, tag: str) -> Optional[float]:
        series = self.scalars.get(tag)
        return series[-1][1] if series else None

    @property
    def final_train_loss(self) -> Optional[float]:
        return _finite(self.summary.get("final_train_loss")) or self.last("train/loss")

    @property
    def final_valid_loss(self) -> Optional[float]:
        return _finite(self.summary.get("final_valid_loss")) or self.last("valid/loss")

    @property
    def tokens_seen(self) -> Optional[float]:
        return self.summary.get("tokens_seen") or self.last("train/tokens_seen")

    @property
    def tokens_per_sec(self) -> Optional[float]:
        return _finite(self.summary.get("tokens_per_sec")) or _mean_tail(self.scalars.get("train/tokens_per_sec"))

    @property
    def step_time(self) -> Optional[float]:
        return _finite(self.summary.get("step_time")) or _mean_tail(self.scalars.get("train/step_time"))


def _finite(value: Any) -> Optional[float]:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _mean_tail(series: Optional[Series], n: int = 5) -> Optional[float]:
    if not series:
        return None
    tail = [v for _, v in series[-n:]]
    return sum(tail) / len(tail)


def format_params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def event_dirs(root: str) -> List[str]:
    """Folders under `root` (itself included) that hold TensorBoard event files, sorted."""
    found = []
    for folder, _, files in os.walk(root):
        if any(f.startswith("events.out.tfevents") for f in files):
            found.append(folder)
    return sorted(found)


def load_scalars(folder: str) -> Dict[str, Series]:
    """Every scalar tag in the event files under `folder`: {tag: [(step, value), ...]} sorted by step.
    Several event files (a resumed run) are merged; for a step logged twice the later file wins."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    merged: Dict[str, Dict[int, float]] = {}
    for sub in event_dirs(folder):
        acc = EventAccumulator(sub, size_guidance={SCALARS: 0})  # 0 = keep every point
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            points = merged.setdefault(tag, {})
            for event in acc.Scalars(tag):
                points[int(event.step)] = float(event.value)
    return {tag: sorted(points.items()) for tag, points in merged.items()}


def _read_yaml(path: str) -> Dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise ExperimentError(f"{path}: cannot parse YAML ({exc}).") from None
    if not isinstance(data, dict):
        raise ExperimentError(f"{path}: expected a mapping of config sections.")
    return data


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ExperimentError(f"{path}: not valid JSON ({exc}).") from None


def load_run(run_dir: str, name: Optional[str] = None) -> Run:
    """Read config.yaml, summary.json and the TensorBoard scalars of one run folder.

    The event files are looked for under the run folder; if there are none there, under the config's
    training.tensorboard_dir. A folder with none of the three raises ExperimentError.
    """
    if not os.path.isdir(run_dir):
        raise ExperimentError(f"{run_dir}: run folder not found.")
    config_path = os.path.join(run_dir, "config.yaml")
    summary_path = os.path.join(run_dir, "summary.json")
    config = _read_yaml(config_path) if os.path.isfile(config_path) else {}
    summary = _read_json(summary_path) if os.path.isfile(summary_path) else {}
    scalars = load_scalars(run_dir)
    tb_dir = (config.get("training") or {}).get("tensorboard_dir")
    if not scalars and tb_dir and os.path.isdir(tb_dir):
        scalars = load_scalars(tb_dir)
    if not (config or summary or scalars):
        raise ExperimentError(f"{run_dir}: no config.yaml, summary.json or TensorBoard events; not a run folder.")
    return Run(path=run_dir, name=name or os.path.basename(os.path.normpath(run_dir)), config=config,
               summary=summary if isinstance(summary, dict) else {}, scalars=scalars)


def expand_run_dirs(patterns: Iterable[str]) -> List[str]:
    """Run folders from paths or glob patterns, in the order given (a pattern's matches sorted).
    A folder that holds no run itself but has run sub-folders stands for those sub-folders."""
    dirs: List[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ExperimentError(f"{pattern}: matches no run folder.")
        for path in matches:
            if not os.path.isdir(path):
                if glob.has_magic(pattern):
                    continue
                raise ExperimentError(f"{path}: run folder not found.")
            if _looks_like_run(path):
                dirs.append(path)
            else:
                subs = [os.path.join(path, d) for d in sorted(os.listdir(path))
                        if os.path.isdir(os.path.join(path, d)) and _looks_like_run(os.path.join(path, d))]
                if not subs:
                    raise ExperimentError(f"{path}: no config.yaml, summary.json or run sub-folders; not a run folder.")
                dirs.extend(subs)
    seen, unique = set(), []
    for d in dirs:
        key = os.path.abspath(d)
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return unique


def _looks_like_run(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("summary.json", "config.yaml", "tensorboard"))


def load_runs(patterns: Iterable[str]) -> List[Run]:
    return [load_run(d) for d in expand_run_dirs(patterns)]


# ----------------------------------------------------------------------------------------------------
# Loss curves and the results table
# ----------------------------------------------------------------------------------------------------
def smooth(values: Sequence[float], weight: float) -> List[float]:
    """TensorBoard-style exponential moving average with bias correction."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(runs: Sequence[Run], path: str, smoothing: float = 0.6, x_axis: str = "iteration") -> str:
    """Two panels (train loss, valid loss) against the iteration (or 'tokens'), one line per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        tokens_per_step = None
        if x_axis == "tokens" and run.tokens_seen and run.summary.get("iterations"):
            tokens_per_step = run.tokens_seen / run.summary["iterations"]
        for ax, tag in zip(axes, ("train/loss", "valid/loss")):
            series = run.scalars.get(tag) or []
            if not series:
                continue
            xs = [s * tokens_per_step if tokens_per_step else s for s, _ in series]
            ys = [v for _, v in series]
            if tag == "train/loss" and smoothing > 0 and len(ys) > 2:
                ax.plot(xs, ys, color=color, alpha=0.2, linewidth=0.8)
                ax.plot(xs, smooth(ys, smoothing), color=color, label=run.label, linewidth=1.6)
            else:
                ax.plot(xs, ys, color=color, label=run.label, marker="o" if len(ys) < 40 else None,
                        markersize=3, linewidth=1.6)
    for ax, title in zip(axes, ("train loss" + (f" (EMA {smoothing})" if smoothing > 0 else ""), "valid loss")):
        ax.set_title(title)
        ax.set_xlabel("tokens" if x_axis == "tokens" else "iteration")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save_figure(fig, path)


def _save_figure(fig, path: str) -> str:
    """Write a matplotlib figure as PNG under a temporary name, then rename (never a half-written plot)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def baseline_run(runs: Sequence[Run], name: Optional[str] = None) -> Optional[Run]:
    """The run step times are compared to: `name` (run or preset name) if given, else the 1-layer
    baseline tiny-1l (or lite-45m) when present, else the first run."""
    if not runs:
        return None
    wanted = [name] if name else ["tiny-1l", "lite-45m"]
    for w in wanted:
        for run in runs:
            if run.name == w:
                return run
        for run in runs:
            if run.preset == w and run.num_loops == 1:
                return run
    if name:
        raise ExperimentError(f"--baseline {name}: no run of that name or preset.")
    return runs[0]


def _fmt(value: Optional[float], spec: str) -> str:
    return "–" if value is None else format(value, spec)


def results_rows(runs: Sequence[Run], baseline: Optional[Run] = None) -> List[Dict[str, Any]]:
    base_time = baseline.step_time if baseline is not None else None
    rows = []
    for run in runs:
        rel = run.step_time / base_time if run.step_time and base_time else None
        rows.append({"run": run.name, "params": run.params, "unique_layers": run.unique_layers,
                     "loops": run.num_loops, "inner_loops": run.inner_loops, "gates": run.gates,
                     "effective_depth": run.effective_depth, "tokens_seen": run.tokens_seen,
                     "final_train_loss": run.final_train_loss, "final_valid_loss": run.final_valid_loss,
                     "tokens_per_sec": run.tokens_per_sec, "step_time": run.step_time, "relative_step_time": rel})
    return rows


def results_markdown(runs: Sequence[Run], baseline: Optional[Run] = None) -> str:
    """| run | params | unique layers | loops | effective depth | gates | tokens seen | final train loss |
    final valid loss | tokens/s | step time (x baseline) |"""
    baseline = baseline if baseline is not None else baseline_run(runs)
    base_name = baseline.name if baseline is not None else "baseline"
    lines = [f"| run | params | unique layers | loops | effective depth | gates | tokens seen | final train loss | "
             f"final valid loss | tokens/s | step time (x {base_name}) |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in results_rows(runs, baseline):
        loops = f"{r['loops']}" + (f" x {r['inner_loops']} inner" if r["inner_loops"] > 1 else "")
        gates = r["gates"] if (r["loops"] > 1 or r["inner_loops"] > 1) else "–"
        tokens = f"{int(r['tokens_seen']):,}" if r["tokens_seen"] is not None else "–"
        lines.append(f"| {r['run']} | {format_params(r['params']) if r['params'] is not None else '–'} | "
                     f"{_fmt(r['unique_layers'], 'd')} | {loops} | {_fmt(r['effective_depth'], 'd')} | {gates} | "
                     f"{tokens} | {_fmt(r['final_train_loss'], '.4f')} | {_fmt(r['final_valid_loss'], '.4f')} | "
                     f"{_fmt(r['tokens_per_sec'], ',.0f')} | {_fmt(r['relative_step_time'], '.2f')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Loss versus loops (tools/evaluate.py --json)
# ----------------------------------------------------------------------------------------------------
@dataclass
class LoopEval:
    """One checkpoint evaluated at several loop counts."""

    name: str
    trained_loops: Optional[int]
    points: List[Dict[str, float]]  # {"loops", "loss", "perplexity", ...} sorted by loops
    path: str = ""


def load_eval_json(path: str, name: Optional[str] = None) -> LoopEval:
    """Read a `tools/evaluate.py --json OUT` file: {"trained_loops", "checkpoint", "results":
    [{"loops", "loss", "perplexity", "tokens", "batches"}, ...]}. The name defaults to the file's stem."""
    if not os.path.isfile(path):
        raise ExperimentError(f"{path}: evaluation JSON not found.")
    data = _read_json(path)
    results = data.get("results") if isinstance(data, dict) else data
    if not isinstance(results, list) or not results:
        raise ExperimentError(f"{path}: expected a 'results' list of {{loops, loss}} entries.")
    points = []
    for i, entry in enumerate(results):
        if not isinstance(entry, dict) or "loops" not in entry or "loss" not in entry:
            raise ExperimentError(f"{path}: results[{i}] lacks 'loops' or 'loss'.")
        point = dict(entry)
        point["loops"] = int(entry["loops"])
        point["loss"] = float(entry["loss"])
        point.setdefault("perplexity", math.exp(min(point["loss"], 50)))
        points.append(point)
    points.sort(key=lambda p: p["loops"])
    trained = data.get("trained_loops") if isinstance(data, dict) else None
    stem = os.path.splitext(os.path.basename(path))[0]
    return LoopEval(name=name or stem, trained_loops=int(trained) if trained is not None else None,
                    points=points, path=path)


def loops_markdown(evals: Sequence[LoopEval], metric: str = "loss") -> str:
    """One row per model, one column per loop count evaluated; * marks the trained loop count."""
    counts = sorted({p["loops"] for e in evals for p in e.points})
    header = "| model | trained loops | " + " | ".join(f"{n} loop{'s' if n > 1 else ''}" for n in counts) + \
             " | best |"
    lines = [header, "|---|---:|" + "---:|" * len(counts) + "---|"]
    for e in evals:
        by_loops = {p["loops"]: p[metric] for p in e.points}
        cells = []
        for n in counts:
            if n in by_loops:
                mark = "*" if n == e.trained_loops else ""
                cells.append(f"{by_loops[n]:.4f}{mark}" if metric == "loss" else f"{by_loops[n]:.2f}{mark}")
            else:
                cells.append("–")
        best = min(e.points, key=lambda p: p[metric])
        lines.append(f"| {e.name} | {e.trained_loops if e.trained_loops is not None else '–'} | "
                     + " | ".join(cells) + f" | {best['loops']} loops |")
    lines.append("")
    lines.append(f"Held-out {metric} at each loop count (* = the loop count the model was trained with).")
    return "\n".join(lines)


def plot_loss_vs_loops(evals: Sequence[LoopEval], path: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, e in enumerate(evals):
        xs = [p["loops"] for p in e.points]
        ys = [p["loss"] for p in e.points]
        color = f"C{i % 10}"
        ax.plot(xs, ys, marker="o", color=color, label=e.name)
        trained = [p for p in e.points if p["loops"] == e.trained_loops]
        if trained:
            ax.plot([trained[0]["loops"]], [trained[0]["loss"]], marker="*", markersize=16, color=color,
                    linestyle="none")
    ax.set_xlabel("loops at evaluation (star: trained loop count)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("loss vs. loop count")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------
def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


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
        _write_text(os.path.join(out_dir, "loss_vs_loops.md"), "# Loss vs. loops\n\n" + table + "\n")
        written["loss_vs_loops_md"] = os.path.join(out_dir, "loss_vs_loops.md")
        sections += ["## Loss vs. loop count at evaluation", "", table, "", "![loss vs loops](loss_vs_loops.png)", ""]
    if not runs and not eval_files:
        raise ExperimentError("nothing to report: give run folders and/or --eval-json files.")
    _write_text(os.path.join(out_dir, "results.md"), "\n".join(sections))
    written["results"] = os.path.join(out_dir, "results.md")
    return written


# ----------------------------------------------------------------------------------------------------
# Budgeting the small experiments
# ----------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
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
    p = argparse.ArgumentParser(prog="python -m loop_megatron.experiments calibrate",
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
    sys.exit(main(prog="python -m loop_megatron.experiments"))
