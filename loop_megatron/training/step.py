"""One optimizer step of the trainer: micro-batches through the DeepSpeed engine, the gradient norm, and
the step's statistics brought to the host with a single synchronisation.

The trainer's loop and `bench/step_bench.py` both call `train_step`, so the bench times the real step.

Gradient norm. Under ZeRO-1/2/3 and bf16/fp16 DeepSpeed's optimizer computes the global norm while it
clips and `engine.get_global_grad_norm()` reports it. Under ZeRO-0 in fp32 DeepSpeed clips through its
per-parameter `clip_grad_norm_` and throws the norm away; there `build_ds_config` turns DeepSpeed's
clipping off and `FusedClipper` clips instead (one multi-tensor norm pass, TP-replicated parameters counted
once, no host sync), so the norm costs nothing extra and is the one the update used.

Non-finite steps. A NaN/inf loss or gradient norm is reported to the trainer (`StepStats.finite`), which
stops the run by default (training/trainer.py). With `skip_nonfinite=True` such a step makes no update,
decided identically on every rank from the global gradient norm:
- the loss is multiplied by 1 (finite) or NaN (not) before backward, on the device, so a non-finite loss
  always gives a non-finite gradient (and so a non-finite global norm) on every rank that computed it; the
  data-parallel reduction and the global norm carry it to every other rank;
- DeepSpeed's ZeRO-1/2/3 and bf16/fp16 optimizers already skip a step whose global norm is not finite
  (they zero the gradients, do not step the LR schedule and count `engine.skipped_steps`; bf16 needs
  `bf16.check_grad_overflow`, DeepSpeed's default, which build_ds_config keeps on in this mode);
- where the trainer clips (ZeRO-0 fp32), DeepSpeed steps the torch optimizer directly, so `SkipGuard`
  reads the clipper's norm before `engine.step()` (one extra host sync, this mode only) and turns the
  torch optimizer's step into a no-op, raising DeepSpeed's own `optimizer.overflow` flag so the engine
  skips the LR-schedule step and counts the skip exactly as on the other layouts.
DeepSpeed cannot undo an update after `engine.step()`, which is why the decision is taken before it.

Answer-masked data (batches with a `loss_mask`, data/loss_mask.py). The step's loss is the mean over every
counted target of the global batch (Megatron's sum(loss * loss_mask) / sum(loss_mask)), not the mean of
micro-batch means, which would weigh a target of a micro-batch with few answer tokens more. The counted
targets of this rank's micro-batches are summed, one all-reduce over the data-parallel group gives the
global count N (on the device, no host sync), and micro-batch m's mean loss is scaled by
n_m x accum x DP / N: DeepSpeed divides by accum and averages the gradients over DP, so the gradient is
that of sum(per-target loss) / N, and the logged loss (the mean of the scaled losses over accum and ranks)
is that mean too. A global batch with no counted target has loss 0 and zero gradients (N is clamped to 1),
not NaN. The same weighting applies when data.eod_mask_loss leaves end-of-document targets out (model/documents.py).
Batches without a mask take the plain path, unchanged: the mean of micro-batch means (all
micro-batches hold the same number of targets there, so the two agree).
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..errors import LoopMegatronError
from ..model.depth import LoopDepth
from ..model.gpt import IGNORE_INDEX
from ..parallel import (get_data_parallel_group, get_data_parallel_world_size, get_tensor_model_parallel_group,
                        get_tensor_model_parallel_world_size)
from ..model.documents import DocumentLayout
from ..model.inputs import is_masked_batch, prepare_inputs
from .ds_config import trainer_clips  # noqa: F401  (re-exported: where the trainer clips)


class FusedClipper:
    """Global-norm clipping of `params`' gradients in two multi-tensor passes (norm, scale).

    Gradients must already be reduced over data-parallel ranks (DeepSpeed's ZeRO-0 backward does that at
    the accumulation boundary). TP-sharded parameters (`tensor_model_parallel`) add their squared norms
    over the TP group; replicated ones are counted once. Same formula as DeepSpeed's and torch's clip:
    g *= min(1, max_norm / (norm + 1e-6)); `max_norm` <= 0 only measures.
    """

    def __init__(self, params: List[torch.nn.Parameter], max_norm: float):
        self.sharded = [p for p in params if getattr(p, "tensor_model_parallel", False)]
        self.replicated = [p for p in params if not getattr(p, "tensor_model_parallel", False)]
        self.max_norm = float(max_norm)
        self.tp = get_tensor_model_parallel_world_size()

    @staticmethod
    def _sq_norm(params: List[torch.nn.Parameter], device: torch.device) -> torch.Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.float32, device=device)
        return torch.nn.utils.get_total_norm(grads, 2.0, foreach=True).float().square()

    @torch.no_grad()
    def __call__(self, device: torch.device) -> torch.Tensor:
        """Clip in place; returns the global norm as a 0-d float32 tensor on `device` (no host sync)."""
        sharded = self._sq_norm(self.sharded, device)
        if self.tp > 1:
            dist.all_reduce(sharded, group=get_tensor_model_parallel_group())
        norm = (sharded + self._sq_norm(self.replicated, device)).sqrt()
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.sharded + self.replicated, self.max_norm, norm, foreach=True)
        return norm


class NonFiniteStepError(LoopMegatronError):
    """A training step's loss or gradient norm was NaN/inf and the run stops (training.skip_nonfinite_steps off)."""


class SkipGuard:
    """Makes the torch optimizer's step a no-op for one step whose gradient norm is not finite (the layouts
    where the trainer clips; see the module docstring). Sets `optimizer.overflow`, which DeepSpeed's engine
    reads after the step: no LR-schedule step, `engine.skipped_steps` += 1."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        optimizer.overflow = False
        inner = optimizer.step

        def step(*args, **kwargs):
            if optimizer.overflow:
                return None
            return inner(*args, **kwargs)

        optimizer.step = step

    def check(self, norm: torch.Tensor) -> None:
        """Before engine.step(): skip this update when `norm` is not finite (one host sync)."""
        self.optimizer.overflow = not bool(torch.isfinite(norm))


def poison_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """`loss` unchanged (x 1.0, bit-exact) when finite, x NaN otherwise, so its backward gives NaN
    gradients: a non-finite loss then always shows in the global gradient norm. No host sync."""
    factor = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan")).to(loss.dtype)
    return loss * factor


class StepStats(NamedTuple):
    """Host-side figures of one optimizer step."""

    loss: float
    """Mean micro-batch loss over the accumulation steps and all ranks (answer-masked data: the mean over the
    global batch's counted targets, module docstring)."""
    grad_norm: Optional[float]
    """Global gradient norm before clipping (None where DeepSpeed reports none)."""
    stop: bool
    """Some rank asked to stop (signal)."""
    finite_norm: bool = True
    """The gradient norm was finite on every rank (False also where DeepSpeed skipped an overflow step)."""
    time_up: bool = False
    """Some rank's `time_up` said the run's time is up (training.exit_duration_in_mins)."""


def target_weights(labels: Sequence[torch.Tensor], accum: int) -> torch.Tensor:
    """Per micro-batch factor n_m x accum x DP / N turning its mean loss into its share of the global batch's
    mean over counted targets (labels not IGNORE_INDEX): n_m counted in micro-batch m, N in the global batch
    (one all-reduce over the data-parallel group). float32 [accum] on the labels' device; N = 0 gives 0s."""
    counts = torch.stack([(y != IGNORE_INDEX).sum() for y in labels]).to(torch.float64)
    total = counts.sum()
    dp = get_data_parallel_world_size()
    if dp > 1:
        dist.all_reduce(total, group=get_data_parallel_group())
    return (counts * (accum * dp) / total.clamp(min=1)).to(torch.float32)


def train_step(engine, batches: Iterator[torch.Tensor], accum: int, device: torch.device,
               clipper: Optional[FusedClipper] = None, stop_requested: Union[bool, Callable[[], bool]] = False,
               depths: Optional[Sequence[LoopDepth]] = None, skip_nonfinite: bool = False,
               skip_guard: Optional[SkipGuard] = None, time_up: Optional[Callable[[], bool]] = None,
               layout: Optional[DocumentLayout] = None) -> StepStats:
    """Forward/backward `accum` micro-batches from `batches` and take one optimizer step.

    `depths` (one LoopDepth per micro-batch, e.g. a sampled loop depth from training/loop_depth.py) go to the
    model's forward; None = the model's own depth. `skip_nonfinite` makes a step with a non-finite loss or
    gradient norm take no update (module docstring); `skip_guard` does that where the trainer clips.
    `layout`: the run's document layout (model/documents.py: positions and attention reset at each
    end-of-document token, the loss after one left out); None sees each window as one text.

    The losses stay on the device; after the step one all-reduce carries the loss sum and the stop flag,
    and one host transfer brings loss, grad norm and flag back together: one host sync per step.
    `stop_requested` may be a callable: it is called right before that all-reduce, so a stop signal that
    arrives while the micro-batches run is carried by this step, not the next one. `time_up` (a callable,
    read at the same point) rides on the same all-reduce: true on any rank is true on every rank, so all
    ranks stop at the same iteration although each reads its own clock.
    """
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    norm = None
    first = next(batches)
    weights = None
    # Answer-masked data, or end-of-document targets left out: weigh micro-batches by their counted targets
    if is_masked_batch(first) or (layout is not None and layout.eod_mask_loss):
        micro = [prepare_inputs(b, device, layout) for b in [first] + [next(batches) for _ in range(accum - 1)]]
        weights = target_weights([y for _, y, _ in micro], accum)
        micro = iter(micro)
    else:
        micro = (prepare_inputs(b, device, layout) for b in itertools.chain([first], batches))
    for m in range(accum):
        x, y, documents = next(micro)
        _, loss = engine(x, labels=y, depth=None if depths is None else depths[m], **documents)
        if weights is not None:
            loss = loss * weights[m]
        if skip_nonfinite:
            loss = poison_nonfinite(loss)
        engine.backward(loss)
        if clipper is not None and m == accum - 1:
            norm = clipper(device)
            if skip_guard is not None:
                skip_guard.check(norm)
        engine.step()
        loss_sum += loss.detach()
    if norm is None:
        norm = engine.get_global_grad_norm()
    world = dist.get_world_size() if dist.is_initialized() else 1
    # A non-finite norm on any rank counts everywhere (the third entry, summed), so every rank decides alike.
    if isinstance(norm, torch.Tensor):
        bad_norm = (~torch.isfinite(norm.detach().reshape(()))).to(torch.float64)
    else:
        bad_norm = torch.tensor(float(norm is not None and not math.isfinite(float(norm))), dtype=torch.float64,
                                device=device)
    if callable(stop_requested):  # read just before the all-reduce: a signal during this step stops this step
        stop_requested = stop_requested()
    late = float(time_up()) if time_up is not None else 0.0
    shared = torch.stack([loss_sum / accum, torch.tensor(float(stop_requested), dtype=torch.float64, device=device),
                          bad_norm.to(device), torch.tensor(late, dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(shared)  # TP ranks hold equal losses; summing over all ranks then / world is the DP mean
    if isinstance(norm, torch.Tensor):
        loss, stop, bad, late, grad_norm = torch.cat([shared, norm.detach().reshape(1).to(shared)]).tolist()
    else:  # DeepSpeed returned a float (or None): nothing on the device to fetch besides `shared`
        loss, stop, bad, late = shared.tolist()
        grad_norm = norm
    return StepStats(loss / world, None if grad_norm is None else float(grad_norm), stop > 0, bad == 0, late > 0)
