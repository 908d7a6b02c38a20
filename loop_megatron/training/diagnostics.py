"""Numbers about the model that the training loop logs and DeepSpeed does not report: each loop
iteration's mean gate. (The gradient norm comes from the step itself: training/step.py.)"""
from __future__ import annotations

from typing import List

import torch



def gate_means(module: torch.nn.Module, zero_stage: int) -> List[float]:
    """Mean of each iteration's gate (collective under ZeRO-3)."""
    gates = getattr(getattr(module, "loop", None), "gates", None)
    if gates is None:
        return []
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([gates], modifier_rank=None):
            return [float(g.float().mean()) for g in gates.detach()]
    return [float(g.float().mean()) for g in gates.detach()]
