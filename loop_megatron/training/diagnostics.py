"""Numbers about the model that the training loop logs and DeepSpeed does not report: the TP-aware
gradient norm (where DeepSpeed's fp32 ZeRO-0 path clips without returning it) and each loop iteration's
mean gate."""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from ..parallel import get_tensor_model_parallel_group, get_tensor_model_parallel_world_size
from .distributed import device as current_device


def tp_aware_grad_norm(module: torch.nn.Module) -> float:
    """L2 norm of all gradients, counting TP-replicated parameters once (used where DeepSpeed's fp32
    ZeRO-0 path clips without reporting the norm). Collective over the TP group."""
    dev = current_device()
    sums = torch.zeros(2, dtype=torch.float64, device=dev)  # [sharded, replicated] sums of squares
    for p in module.parameters():
        if p.grad is not None:
            sharded = bool(getattr(p, "tensor_model_parallel", False))
            sums[0 if sharded else 1] += p.grad.detach().double().pow(2).sum().to(dev)
    if get_tensor_model_parallel_world_size() > 1:
        sharded_sum = sums[:1].clone()
        dist.all_reduce(sharded_sum, group=get_tensor_model_parallel_group())
        sums[0] = sharded_sum[0]
    return float(sums.sum().sqrt())


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
