"""One optimizer step of the trainer: micro-batches through the DeepSpeed engine, the gradient norm, and
the step's statistics brought to the host with a single synchronisation.

The trainer's loop and `bench/step_bench.py` both call `train_step`, so the bench times the real step.

Gradient norm. Under ZeRO-1/2/3 and bf16/fp16 DeepSpeed's optimizer computes the global norm while it
clips and `engine.get_global_grad_norm()` reports it. Under ZeRO-0 in fp32 DeepSpeed clips through its
per-parameter `clip_grad_norm_` and throws the norm away; there `build_ds_config` turns DeepSpeed's
clipping off and `FusedClipper` clips instead (one multi-tensor norm pass, TP-replicated parameters counted
once, no host sync), so the norm costs nothing extra and is the one the update used.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..model.depth import LoopDepth
from ..parallel import get_tensor_model_parallel_group, get_tensor_model_parallel_world_size
from .data import split_inputs
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


class StepStats(NamedTuple):
    """Host-side figures of one optimizer step."""

    loss: float
    """Mean micro-batch loss over the accumulation steps and all ranks."""
    grad_norm: Optional[float]
    """Global gradient norm before clipping (None where DeepSpeed reports none)."""
    stop: bool
    """Some rank asked to stop (signal)."""


def train_step(engine, batches: Iterator[torch.Tensor], accum: int, device: torch.device,
               clipper: Optional[FusedClipper] = None, stop_requested: Union[bool, Callable[[], bool]] = False,
               depths: Optional[Sequence[LoopDepth]] = None) -> StepStats:
    """Forward/backward `accum` micro-batches from `batches` and take one optimizer step.

    `depths` (one LoopDepth per micro-batch, e.g. a sampled loop depth from training/loop_depth.py) go to the
    model's forward; None = the model's own depth.

    The losses stay on the device; after the step one all-reduce carries the loss sum and the stop flag,
    and one host transfer brings loss, grad norm and flag back together: one host sync per step.
    `stop_requested` may be a callable: it is called right before that all-reduce, so a stop signal that
    arrives while the micro-batches run is carried by this step, not the next one.
    """
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    norm = None
    for m in range(accum):
        x, y = split_inputs(next(batches), device)
        _, loss = engine(x, labels=y, depth=None if depths is None else depths[m])
        engine.backward(loss)
        if clipper is not None and m == accum - 1:
            norm = clipper(device)
        engine.step()
        loss_sum += loss.detach()
    if norm is None:
        norm = engine.get_global_grad_norm()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if callable(stop_requested):
        stop_requested = stop_requested()
    shared = torch.stack([loss_sum / accum, torch.tensor(float(stop_requested), dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(shared)  # TP ranks hold equal losses; summing over all ranks then / world is the DP mean
    if isinstance(norm, torch.Tensor):
        loss, stop, grad_norm = torch.cat([shared, norm.detach().reshape(1).to(shared)]).tolist()
    else:  # DeepSpeed returned a float (or None): nothing on the device to fetch besides `shared`
        loss, stop = shared.tolist()
        grad_norm = norm
    return StepStats(loss / world, None if grad_norm is None else float(grad_norm), stop > 0)
