"""TensorBoard scalars, the console progress line, per-step metrics, MFU and the run summary.

TensorBoard tags (a plotting tool reads them; x axis = iteration):
    every step:          train/loss, train/lr, train/grad_norm, train/tokens_seen, train/skipped_steps
                         (steps that made no update: non-finite with training.skip_nonfinite_steps)
    every log_interval:  train/tokens_per_sec, train/step_time, train/mfu (only when a peak is known),
                         gates/iter_{n}_mean (n = 1..num_loops, gated models only)
    every evaluation:    valid/loss
Weights & Biases (training.wandb_project set): rank 0 logs the same scalars under the same tags to a W&B run
(step = iteration) whose config is the resolved Config; `wandb_init_kwargs` says where and under what name.
WANDB_MODE=offline (no network) writes <dir>/wandb/offline-run-*/, which `wandb sync` uploads later.
MFU = flops_per_token(model, seq_len) x tokens/s / (peak FLOP/s per device x devices). The peak comes from
training.peak_tflops, else a table of bf16 dense peaks for known GPUs; on CPU (or an unknown device) MFU
is not computed: the console shows "mfu n/a" and no train/mfu scalar is written.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, Optional

import torch

from ..config import Config, ConfigError
from ..utils import fs

# bf16 dense peak TFLOP/s per device (vendor datasheets, SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def peak_flops_per_device(peak_tflops: float = 0.0) -> Optional[float]:
    if peak_tflops and peak_tflops > 0:
        return peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value * 1e12
    return None


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def wandb_available() -> bool:
    """Whether the wandb package can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def wandb_init_kwargs(cfg: Config) -> Optional[Dict[str, Any]]:
    """Keyword arguments of `wandb.init` for this run, or None without training.wandb_project: project,
    name (training.wandb_exp_name, else the run folder's name), dir (training.wandb_save_dir, else
    <run_dir>/wandb; W&B makes its own wandb/ inside it) and the resolved config."""
    t = cfg.training
    if not t.wandb_project:
        return None
    return {"project": t.wandb_project,
            "name": t.wandb_exp_name or os.path.basename(os.path.normpath(t.run_dir)) or "run",
            "dir": t.wandb_save_dir or os.path.join(t.run_dir, "wandb"),
            "config": cfg.to_dict()}


class RunLogger:
    """Rank-0 sink for scalars (TensorBoard, metrics.jsonl and, with `wandb_kwargs`, a W&B run) and console
    lines; no-ops elsewhere."""

    def __init__(self, run_dir: str, tensorboard_dir: str, enabled: bool,
                 wandb_kwargs: Optional[Dict[str, Any]] = None):
        self.enabled = enabled
        self.writer = None
        self.metrics = None
        self.wandb_run = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=tensorboard_dir)
        self.metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if wandb_kwargs:
            self.wandb_run = start_wandb(wandb_kwargs)

    def scalars(self, iteration: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        finite = {tag: float(value) for tag, value in values.items()
                  if value is not None and math.isfinite(float(value))}
        for tag, value in finite.items():
            self.writer.add_scalar(tag, value, iteration)
        if self.wandb_run is not None and finite:
            self.wandb_run.log(finite, step=iteration)

    def record(self, record: Dict) -> None:
        """One JSON line in <run_dir>/metrics.jsonl (every step and evaluation)."""
        if not self.enabled:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()
            self.metrics.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.metrics.close()
            if self.wandb_run is not None:
                self.wandb_run.finish()
                self.wandb_run = None
            self.enabled = False


def start_wandb(kwargs: Dict[str, Any]):
    """`wandb.init(**kwargs)` with W&B's console capture off (the trainer prints its own lines); a W&B
    that cannot start (no login and no network without WANDB_MODE=offline, ...) is one ConfigError."""
    import wandb

    os.makedirs(kwargs["dir"], exist_ok=True)
    try:
        return wandb.init(**kwargs, settings=wandb.Settings(console="off"))
    except Exception as exc:  # wandb raises its own error classes (UsageError, CommError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"training.wandb_project: W&B could not start ({first}); set WANDB_MODE=offline to "
                          f"write the run to {kwargs['dir']} for `wandb sync` to upload later.") from None


class Throughput:
    """Window statistics between two progress lines."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.losses, self.times, self.grad_norms = [], [], []
        self.start = time.perf_counter()

    def add(self, loss: float, step_time: float, grad_norm: Optional[float]) -> None:
        self.losses.append(loss)
        self.times.append(step_time)
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)

    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")

    def mean_step_time(self) -> float:
        return sum(self.times) / len(self.times) if self.times else float("nan")


def progress_line(iteration: int, total: int, loss: float, lr: float, grad_norm: Optional[float],
                  tokens_per_sec: float, step_time: float, mfu: Optional[float], eta_s: float) -> str:
    gn = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
    mfu_s = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
    width = len(str(total))
    return (f"iter {iteration:>{width}}/{total} | loss {loss:.4f} | lr {lr:.3e} | grad_norm {gn} | "
            f"tokens/s {tokens_per_sec:,.0f} | step {step_time * 1000:.1f} ms | mfu {mfu_s} | "
            f"ETA {format_eta(eta_s)}")


def write_summary(path: str, summary: Dict) -> None:
    fs.write_json(path, summary, indent=2, trailing_newline=True)
