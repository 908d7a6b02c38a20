"""Loading part of a checkpoint: Megatron-LM's --no-load-optim, --no-load-rng and --finetune.

Both partial loads take the weights the same way, which works on any layout (TP size, world size, ZeRO
stage, precision) because it never reads DeepSpeed's shards: `load_weights` puts this rank's TP shard of
every full fp32 master into the model before `deepspeed.initialize` (from `universal/`, the optimizer's
own masters, when it is complete; else `model.pt`, the consolidated weights), and, where the run keeps
16-bit weights, `set_master_weights` afterwards replaces DeepSpeed's fp32 masters (which it made from the
rounded 16-bit weights) by the checkpoint's exact values. The optimizer is DeepSpeed's fresh one: no
moments, step count 0.

- training.no_load_optim (Resume mode "weights"): `load_position` then sets the run's position as a full
  resume would: the LR schedule's state (meta.json's record; universal/state.json's for checkpoints from
  before it; the iteration for older ones), DeepSpeed's step and sample counters, and the RNG (each rank's
  saved state on the saved layout, else reseeded from (seed, iteration)). The data continues from the
  checkpoint's consumed samples.
- training.finetune (mode "finetune"): the weights only; iteration 0, sample 0, the schedule and the RNG
  as a fresh run has them.
- training.no_load_rng: `restore_rng_or_reseed` reseeds from (seed, iteration) instead of reading the
  per-rank states (for the "engine" and "weights" modes; "universal" always reseeds).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

from ..model import shard_tp_tensor
from ..utils.distributed import barrier, rank
from . import universal
from .layout import CheckpointError, model_path
from .rng import reseed, restore_rng


class MasterWeights:
    """The full (TP=1) fp32 master weight of each parameter of a checkpoint folder, by parameter name:
    from universal/ when it is complete (the optimizer's masters, exact also for 16-bit runs at ZeRO-0), else
    from model.pt (read once, on first use)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.from_universal = False
        if universal.has_universal(folder):
            try:
                universal.check_complete(folder)
                self.from_universal = True
            except universal.UniversalError:
                pass
        self._model: Optional[Dict[str, torch.Tensor]] = None

    @property
    def source(self) -> str:
        """Where the weights come from, for the log."""
        return os.path.join(self.folder, universal.UNIVERSAL_DIR) if self.from_universal else model_path(self.folder)

    def __getitem__(self, name: str) -> torch.Tensor:
        if self.from_universal:
            return universal.read_param(self.folder, name)[universal.MASTER]
        if self._model is None:
            path = model_path(self.folder)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: missing; the checkpoint holds no weights to load.")
            self._model = torch.load(path, map_location="cpu", weights_only=True)
        if name not in self._model:
            raise CheckpointError(f"{model_path(self.folder)}: no tensor {name!r}; it does not fit this model.")
        return self._model[name]


def load_weights(model: torch.nn.Module, folder: str) -> str:
    """Before deepspeed.initialize: this rank's TP shard of every fp32 master of `folder` into `model` (every
    rank reads; nothing is communicated). Returns where the weights came from."""
    masters = MasterWeights(folder)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shard = shard_tp_tensor(masters[name], p)
            if tuple(shard.shape) != tuple(p.shape):
                raise CheckpointError(f"{masters.source}: {name!r} has shape {tuple(shard.shape)} on this rank, the "
                                      f"model {tuple(p.shape)}.")
            p.copy_(shard)
    return masters.source


def set_master_weights(engine, folder: str) -> bool:
    """After deepspeed.initialize, for a run with 16-bit weights: set every rank's part of DeepSpeed's fp32
    masters to the checkpoint's values (local copies, no collective). False (nothing to do) in fp32, where
    DeepSpeed's masters are the module's own weights, loaded exactly by `load_weights`."""
    if not any(p.dtype in (torch.bfloat16, torch.float16) for p in engine.module.parameters()):
        return False
    reason = universal.unsupported_reason(engine)
    if reason is not None:
        raise CheckpointError(f"{folder}: the fp32 masters cannot be set in this run's optimizer ({reason}).")
    masters = MasterWeights(folder)
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            universal._scatter_parameter(engine, p, {universal.MASTER: masters[name]}, name, (universal.MASTER,))
    return True


def restore_rng_or_reseed(folder: str, restore: bool, seed: int, iteration: int) -> str:
    """This rank's RNG state from the checkpoint when `restore` (and the folder holds one for this rank),
    else every RNG reseeded from (seed, iteration) as on a new layout. Returns which, for the log."""
    if restore and restore_rng(folder, rank()):
        return "RNG from the checkpoint"
    reseed(seed, iteration)
    return "RNG reseeded from (seed, iteration)"


def scheduler_state(folder: str, meta: Dict[str, Any]) -> Dict[str, Any]:
    """The LR scheduler's saved state: meta.json's record, else universal/state.json's, else (older
    checkpoints) one update per iteration."""
    if isinstance(meta.get("lr_scheduler"), dict):
        return meta["lr_scheduler"]
    if universal.has_universal(folder):
        state = universal.read_state(folder).get("lr_scheduler")
        if isinstance(state, dict):
            return state
    return {"last_step": int(meta.get("iteration", 0))}


def load_position(engine, folder: str, meta: Dict[str, Any], *, seed: int, restore: bool) -> Dict[str, Any]:
    """training.no_load_optim, after deepspeed.initialize and `set_master_weights`: the LR schedule's
    position, DeepSpeed's counters and the RNG (`restore_rng_or_reseed`). Returns {"iteration",
    "consumed_samples", "rng"} like DeepSpeed's client state. Every rank; a barrier at the end."""
    iteration, consumed = int(meta.get("iteration", 0)), int(meta.get("consumed_samples", 0))
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is not None:
        scheduler.load_state_dict(scheduler_state(folder, meta))
    engine.global_steps = iteration
    engine.global_samples = consumed
    how = restore_rng_or_reseed(folder, restore, seed, iteration)
    barrier()
    return {"iteration": iteration, "consumed_samples": consumed, "rng": how}
