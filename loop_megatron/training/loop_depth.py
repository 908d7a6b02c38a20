"""How deep the loop runs at each training step: schedules, depth sampling and FLOP-relevant counts.

Everything here is a pure function of (config, iteration[, sample index]): no state, no communication.
Every TP, DP and ZeRO rank computes the same depth for the same step, and a resumed run replays exactly
the depths of the uninterrupted one.

* `LoopSchedule` (`training.loop_schedule`): the *level* L(p) at training progress p = iteration /
  train_iters. Piecewise constant ('0:1,0.35:4': L = 1 until 35%, then 4) or linear
  ('linear:0:1,0.5:4': from 1 at p = 0 to 4 at p = 0.5, then 4). Without a schedule L is the sampler's
  own level: model.num_loops ('fixed'), mean_loops ('poisson-lognormal'), max_loops ('uniform').
* `LoopDepthSampler` (`training.loop_sampling`) turns the level into a depth r:
    fixed               r = round(L), capped at max_loops when set
    uniform             r ~ U{1 .. round(L)}
    poisson-lognormal   tau ~ N(log(L - 1) - sigma^2 / 2, sigma), r = 1 + Poisson(exp(tau)), capped at
                        max_loops (sigma = 0.5). E[exp(tau)] = L - 1, so E[r] = L before the cap. (Huginn
                        writes the rate's mean as the mean recurrence and adds 1; we take the field at its
                        word, mean_loops = the mean depth.)
  One depth per step: drawn from a torch.Generator seeded by (seed, iteration, micro-batch index).
  Per-sequence depths (`training.loop_sampling_per_sequence`): sample i of the run (its global index in
  the order samples are consumed, consumed_samples + position) gets a depth from a generator seeded by
  (seed, i) at the level of the current iteration, so the data-parallel layout does not change it. A
  micro-step should run every DP rank to the same deepest row (ZeRO-3 gathers parameters collectively,
  once per module call), which `micro_step_depths` gives without communication: every rank draws the
  depths of the whole micro-step's global sample range and takes its own rows.
* `loop_flop_counts(r, k)`: the iterations the forward ran and the backward ran through, for MFU.
"""
from __future__ import annotations

import hashlib
import math
from typing import List, Optional, Tuple

import torch

from ..config import Config, ModelConfig, parse_loop_schedule
from ..model.depth import LoopDepth
from ..model.stats import flops_per_token
from .data import micro_batch_indices

LOGNORMAL_SIGMA = 0.5  # Huginn's sigma


def _seed(*parts: int) -> int:
    """A 63-bit seed that is a stable function of the integers (the same in every process)."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _round(v: float) -> int:
    return int(math.floor(v + 0.5))


class LoopSchedule:
    """The loop level L as a function of the iteration (a pure function: resumes exactly)."""

    def __init__(self, text: str, train_iters: int, default: float):
        self.kind, self.points = parse_loop_schedule(text)
        self.train_iters = max(1, int(train_iters))
        self.default = float(default)

    def progress(self, iteration: int) -> float:
        return min(1.0, max(0.0, iteration / self.train_iters))

    def level(self, iteration: int) -> float:
        """L at `iteration` (0-based index of the optimizer step being taken)."""
        if self.kind == "none":
            return self.default
        p = self.progress(iteration)
        i = max(j for j, (q, _) in enumerate(self.points) if q <= p)
        q0, v0 = self.points[i]
        if self.kind == "step" or i + 1 == len(self.points):
            return v0
        q1, v1 = self.points[i + 1]
        return v0 + (v1 - v0) * (p - q0) / (q1 - q0)


class LoopDepthSampler:
    """Depths for training steps from `training.loop_sampling`, `mean_loops`, `max_loops`,
    `backprop_loops`, `loop_schedule` and `loop_sampling_per_sequence` (see the module docstring)."""

    def __init__(self, cfg: Config, sigma: float = LOGNORMAL_SIGMA):
        m, t = cfg.model, cfg.training
        self.kind = t.loop_sampling
        self.per_sequence = t.loop_sampling_per_sequence
        self.seed = t.seed
        self.max_loops = t.max_loops
        self.backprop_loops = t.backprop_loops
        self.eval_loops_field = t.eval_loops
        self.sigma = sigma
        default = {"fixed": m.num_loops, "uniform": t.max_loops,
                   "poisson-lognormal": t.mean_loops or m.num_loops}[self.kind]
        self.schedule = LoopSchedule(t.loop_schedule, t.train_iters, default)
        self.train_iters = t.train_iters

    # -- one depth from a generator ------------------------------------------------------------------
    def _cap(self, r: int) -> int:
        return max(1, min(r, self.max_loops) if self.max_loops else r)

    def _draw(self, level: float, gen: torch.Generator, n: int) -> torch.Tensor:
        """n depths at `level` from `gen` (LongTensor [n], CPU)."""
        if self.kind == "fixed":
            return torch.full((n,), self._cap(_round(level)), dtype=torch.long)
        if self.kind == "uniform":
            high = self._cap(_round(level))
            return torch.randint(1, high + 1, (n,), generator=gen)
        # poisson-lognormal
        rate_mean = level - 1.0
        if rate_mean <= 0:
            return torch.ones(n, dtype=torch.long)
        tau = torch.randn(n, generator=gen, dtype=torch.float64) * self.sigma + (math.log(rate_mean) - self.sigma ** 2 / 2)
        r = 1 + torch.poisson(torch.exp(tau), generator=gen).long()
        return r.clamp(min=1, max=self.max_loops) if self.max_loops else r

    # -- public API ----------------------------------------------------------------------------------
    def level(self, iteration: int) -> float:
        return self.schedule.level(iteration)

    def step_loops(self, iteration: int, micro_batch: int = 0) -> int:
        """The depth r of micro-batch `micro_batch` of optimizer step `iteration` (same on every rank)."""
        gen = torch.Generator().manual_seed(_seed(self.seed, 0x100F, iteration, micro_batch))
        return int(self._draw(self.level(iteration), gen, 1)[0])

    def sample_loops(self, iteration: int, sample_indices: torch.Tensor) -> torch.Tensor:
        """Per-sequence depths [n] of the samples with these global indices at step `iteration`."""
        level = self.level(iteration)
        out = [self._draw(level, torch.Generator().manual_seed(_seed(self.seed, 0x5EC, int(i))), 1)
               for i in sample_indices.view(-1).tolist()]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def micro_step_depths(self, iteration: int, micro_batch: int, first_sample: int, micro_batch_size: int,
                          dp_rank: int = 0, dp_size: int = 1) -> LoopDepth:
        """The depths of one micro-step on data-parallel rank `dp_rank`.

        `first_sample` is the global index of the first sample of this micro-step over all DP ranks
        (consumed_samples at the start of it), and DP rank d holds samples first_sample + d * mbs ...
        + (d + 1) * mbs - 1 (the contiguous layout of a Megatron-style batch sampler). In per-sequence
        mode every rank runs max over the whole micro-step, so ZeRO-3's collectives line up."""
        k = self.backprop_loops
        if not self.per_sequence:
            return LoopDepth(self.step_loops(iteration, micro_batch), k)
        every = self.sample_loops(iteration, torch.arange(first_sample, first_sample + micro_batch_size * dp_size))
        mine = every[dp_rank * micro_batch_size:(dp_rank + 1) * micro_batch_size]
        return LoopDepth(int(every.max()), k, mine, max(int(every.min()) - k, 0) if k else None)

    def eval_loops(self, iteration: Optional[int] = None) -> int:
        """Depth for evaluation: training.eval_loops, else the level (at `iteration`, default the end of
        training) read as a depth: round(L) for fixed and poisson-lognormal, round((1 + L) / 2) uniform."""
        if self.eval_loops_field:
            return self.eval_loops_field
        level = self.level(self.train_iters if iteration is None else iteration)
        if self.kind == "uniform":
            level = (1 + self._cap(_round(level))) / 2
        return self._cap(_round(level))


def depth_is_varied(cfg: Config) -> bool:
    """Whether the depth can differ from model.num_loops between steps (sampling or a schedule): then the
    trainer logs `train/loops`."""
    t = cfg.training
    return t.loop_sampling != "fixed" or bool(t.loop_schedule.strip()) or t.loop_sampling_per_sequence


def step_depths(sampler: LoopDepthSampler, iteration: int, accum: int, global_batch: int,
                micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1) -> List[LoopDepth]:
    """The LoopDepth of each of the `accum` micro-batches of optimizer step `iteration` on `dp_rank`.

    Samples are laid out as training/data.py's TrainBatchSampler consumes them: step `iteration` starts
    at consumed = iteration * global_batch and micro-step m covers the next micro_batch_size * dp_size
    samples, DP rank d holding the d-th run of micro_batch_size of them."""
    consumed = iteration * global_batch
    return [sampler.micro_step_depths(iteration, m, micro_batch_indices(consumed, micro_batch_size, dp_size, 0, m)[0],
                                      micro_batch_size, dp_rank, dp_size)
            for m in range(accum)]


def step_flops_per_token(model_cfg: ModelConfig, seq_length: int, depths: List[LoopDepth]) -> float:
    """Training FLOPs per token of a step whose micro-batches ran `depths` (forward over each r, backward
    over each k), averaged over the micro-batches (they hold the same number of tokens)."""
    counts = [loop_flop_counts(d.num_loops, d.backprop_loops) for d in depths]
    return sum(flops_per_token(model_cfg, seq_length, True, loops=r, backprop_loops=k) for r, k in counts) / len(counts)


def loop_flop_counts(num_loops: int, backprop_loops: int = 0) -> Tuple[int, int]:
    """(forward iterations r, backward iterations k) of a step; pass them to
    `model.flops_per_token(cfg, T, loops=r, backprop_loops=k)` for the FLOPs actually run."""
    r = int(num_loops)
    k = r if not backprop_loops else min(int(backprop_loops), r)
    return r, k


__all__ = ["LOGNORMAL_SIGMA", "LoopDepthSampler", "LoopSchedule", "depth_is_varied", "loop_flop_counts",
           "step_depths", "step_flops_per_token"]
