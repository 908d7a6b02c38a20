"""Training runs and evaluation results read back from disk.

A run folder is what `python -m loop_megatron.train --run-dir DIR` leaves behind: `config.yaml` (the
resolved config), `summary.json` (params, depth, tokens seen, final losses, speed) and TensorBoard event
files under `tensorboard/` (scalars `train/loss`, `valid/loss`, ... against the iteration). `load_run` /
`load_runs` read them into `Run` records (TensorBoard through `EventAccumulator`); `load_eval_json` reads
a `tools/evaluate.py --json` file (one checkpoint at several loop counts) into a `LoopEval`. The file
readers underneath, `read_yaml`, `read_json` and `read_jsonl` (the run's `metrics.jsonl` records), are
public for analyses of their own (studies/); the first two raise ExperimentError naming a file they
cannot parse. `archive_run` copies a run's records, thinned, into a results folder, so that a study's
report rebuilds from committed results alone.
"""
from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

from ..errors import LoopMegatronError

Series = List[Tuple[int, float]]


class ExperimentError(LoopMegatronError):
    """A run folder or results file that cannot be read; the message names it."""


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
                from ..config import Config
                from ..model.stats import parameter_count

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


def read_yaml(path: str) -> Dict[str, Any]:
    """A YAML mapping (a run's config.yaml); ExperimentError names the file when it cannot be parsed or is
    not a mapping. An empty file reads as {}."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise ExperimentError(f"{path}: cannot parse YAML ({exc}).") from None
    if not isinstance(data, dict):
        raise ExperimentError(f"{path}: expected a mapping of config sections.")
    return data


def read_json(path: str) -> Any:
    """A JSON file (summary.json, a `tools/evaluate.py --json` output, ...); ExperimentError names the file
    when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ExperimentError(f"{path}: not valid JSON ({exc}).") from None


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    """The records of a JSON-lines file (a run's metrics.jsonl: one record per logged step or evaluation),
    in file order; [] when the file does not exist. Blank lines are skipped, and so is a line that is not
    valid JSON (one cut by an interruption: the rest of the file is still good)."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out


def load_run(run_dir: str, name: Optional[str] = None) -> Run:
    """Read config.yaml, summary.json and the TensorBoard scalars of one run folder.

    The event files are looked for under the run folder; if there are none there, under the config's
    training.tensorboard_dir. A folder with none of the three raises ExperimentError.
    """
    if not os.path.isdir(run_dir):
        raise ExperimentError(f"{run_dir}: run folder not found.")
    config_path = os.path.join(run_dir, "config.yaml")
    summary_path = os.path.join(run_dir, "summary.json")
    config = read_yaml(config_path) if os.path.isfile(config_path) else {}
    summary = read_json(summary_path) if os.path.isfile(summary_path) else {}
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
    data = read_json(path)
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


def _is_training_record(rec: Dict[str, Any]) -> bool:
    return "loss" in rec and not any(k.startswith(("valid", "test")) for k in rec)


def archive_run(run_dir: str, dest: str, every: int = 5) -> None:
    """Copy a run's summary.json and config.yaml into dest, with a thinned metrics.jsonl (every `every`-th
    training step, the first and last, every evaluation record) and the exact mean training FLOPs per
    token added to the summary as `train_flops_per_token` (the thinned records would only approximate it)."""
    from ..utils import fs

    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    summary_path = os.path.join(run_dir, "summary.json")
    summary = read_json(summary_path) if os.path.isfile(summary_path) else {}
    flops = [r["flops_per_token"] for r in records if r.get("flops_per_token") is not None]
    if flops:
        summary["train_flops_per_token"] = sum(flops) / len(flops)
    train_steps = [r.get("iteration") for r in records if _is_training_record(r)]
    ends = {train_steps[0], train_steps[-1]} if train_steps else set()
    kept = [r for r in records if not _is_training_record(r)
            or r.get("iteration") in ends or (r.get("iteration") or 0) % every == 0]
    fs.write_json(os.path.join(dest, "summary.json"), summary, make_parent=True)
    fs.write_text(os.path.join(dest, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in kept))
    config = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            fs.write_text(os.path.join(dest, "config.yaml"), f.read())
