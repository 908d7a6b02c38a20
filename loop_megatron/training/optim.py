"""AdamW parameter groups and the learning-rate scheduler (Megatron-LM's schedules: config.LRSchedule)."""
from __future__ import annotations

from typing import Any, Dict, List

import torch.nn as nn

from ..config import TrainingConfig, lr_schedule


def parameter_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Two AdamW groups: decayed weights, and the model's no-decay names (biases, norms, gates)."""
    no_decay = set(model.no_decay_parameter_names())
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (keep if name in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if keep:
        groups.append({"params": keep, "weight_decay": 0.0})
    return groups


def lr_at(position: float, t: TrainingConfig) -> float:
    """Learning rate of the update made at `position` on the schedule of `t` (config.LRSchedule: updates
    already applied, or the samples they consumed in a sample-based run)."""
    return lr_schedule(t).at(position)


class LRScheduler:
    """Sets the optimizer's learning rate from the run's position on its LR schedule (config.LRSchedule,
    Megatron-LM's curves); resumable exactly.

    The state is two integers, saved by DeepSpeed with the engine checkpoint and in universal/state.json:
    `last_step`, the updates applied, and `samples`, the samples those updates consumed. DeepSpeed calls
    `step()` only for an update it applied (a skipped step does not advance the schedule, as in
    Megatron-LM), so the position is `last_step` in an iteration-based run and `samples` in a sample-based
    one, and the rate a pure function of it: a resumed run continues on the same curve.
    """

    def __init__(self, optimizer, cfg: TrainingConfig, global_batch: int, last_step: int = 0):
        self.optimizer = optimizer
        self.cfg = cfg
        self.global_batch = int(global_batch)
        self.schedule = lr_schedule(cfg)
        self.last_step = last_step
        self.samples = last_step * self.global_batch
        self._apply()

    @property
    def position(self) -> int:
        """Where the next update is on the curve, in the schedule's unit."""
        return self.samples if self.schedule.unit == "samples" else self.last_step

    @property
    def lr(self) -> float:
        """The rate of the next update."""
        return self._last_lr[0]

    def _apply(self) -> None:
        lr = self.schedule.at(self.position)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr] * max(1, len(self.optimizer.param_groups))

    def step(self, *args, **kwargs) -> None:
        self.last_step += 1
        self.samples += self.global_batch
        self._apply()

    def get_last_lr(self) -> List[float]:
        return list(self._last_lr)

    def state_dict(self) -> Dict[str, Any]:
        return {"last_step": self.last_step, "samples": self.samples}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Take the position of a saved state (one without `samples` predates them: its updates were all of
        this run's global batch)."""
        self.last_step = int(state["last_step"])
        self.samples = int(state.get("samples", self.last_step * self.global_batch))
        self._apply()
