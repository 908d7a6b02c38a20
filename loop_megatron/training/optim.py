"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch.nn as nn

from ..config import TrainingConfig


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


def lr_at(step: int, t: TrainingConfig) -> float:
    """Learning rate of optimizer update number `step` (0-based).

    Linear warmup over lr_warmup_iters updates ((step + 1) / warmup x lr, so the first update already
    moves), then cosine from lr down to min_lr at lr_decay_iters (default train_iters), min_lr after.
    """
    warmup = max(0, t.lr_warmup_iters)
    decay_iters = t.lr_decay_iters or t.train_iters
    if step < warmup:
        return t.lr * (step + 1) / warmup
    if step >= decay_iters or decay_iters <= warmup:
        return t.min_lr
    progress = (step - warmup) / (decay_iters - warmup)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosineLR:
    """Sets the optimizer's learning rate from the number of updates taken; resumable exactly.

    The whole state is one integer (`last_step`), saved by DeepSpeed with the engine checkpoint; the rate
    is a pure function of it, so a resumed run continues on the same curve.
    """

    def __init__(self, optimizer, cfg: TrainingConfig, last_step: int = 0):
        self.optimizer = optimizer
        self.cfg = cfg
        self.last_step = last_step
        self._apply()

    def _apply(self) -> None:
        lr = lr_at(self.last_step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr] * len(self.optimizer.param_groups)

    def step(self, *args, **kwargs) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> List[float]:
        return list(self._last_lr)

    def state_dict(self) -> Dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self._apply()
