"""TensorBoard scalars, the console progress line, per-step metrics, MFU and the run summary.

TensorBoard tags (a plotting tool reads them; x axis = iteration):
    every step:          train/loss, train/lr, train/grad_norm, train/tokens_seen, train/skipped_steps
                         (steps that made no update: non-finite with training.skip_nonfinite_steps)
    every log_interval:  train/tokens_per_sec, train/step_time, train/mfu (only when a peak is known),
                         gates/iter_{n}_mean (n = 1..num_loops, gated models only)
    every evaluation:    valid/loss
MFU = flops_per_token(model, seq_len) x tokens/s / (peak FLOP/s per device x devices). The peak comes from
training.peak_tflops, else a table of bf16 dense peaks for known GPUs; on CPU (or an unknown device) MFU
is not computed: the console shows "mfu n/a" and no train/mfu scalar is written.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Dict, Optional

import torch

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


class RunLogger:
    """Rank-0 sink for scalars (TensorBoard + metrics.jsonl) and console lines; no-ops elsewhere."""

    def __init__(self, run_dir: str, tensorboard_dir: str, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.metrics = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=tensorboard_dir)
        self.metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")

    def scalars(self, iteration: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        for tag, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(tag, float(value), iteration)

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
            self.enabled = False


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
