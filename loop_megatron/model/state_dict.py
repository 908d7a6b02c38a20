"""Moving between tensor-parallel shards and the full (TP=1) state dict.

A TP=1 state dict is the project's interchange format: checkpoints store it consolidated, the Hugging
Face converter reads it, and tests compare TP=2 against TP=1 through it. Sharded parameters describe
their own layout through `partition_dim` / `partition_stride` (set by the parallel layers).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist
import torch.nn as nn

from ..parallel import (get_tensor_model_parallel_group, get_tensor_model_parallel_rank,
                        get_tensor_model_parallel_world_size, merge_shards, shard_tensor)


def _is_sharded(p: torch.Tensor) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The TP=1 state dict of `model` (fp32, CPU), gathered over the TP group. Collective over TP ranks.

    Parameters must be materialised (under ZeRO-3, call inside deepspeed.zero.GatheredParameters).
    """
    world = get_tensor_model_parallel_world_size()
    params = dict(model.named_parameters())
    out: Dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        p = params.get(name)
        t = tensor.detach()
        if world > 1 and p is not None and _is_sharded(p):
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous(), group=get_tensor_model_parallel_group())
            t = merge_shards(parts, p.partition_dim, p.partition_stride)
        out[name] = t.float().cpu().clone()
    return out


def load_full_state_dict(model: nn.Module, full: Dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load a TP=1 state dict into a (possibly TP-sharded) model, keeping this rank's shard."""
    world, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    params = dict(model.named_parameters())
    own = model.state_dict()
    # A checkpoint without an exit gate loads into a model with one (the gate-only training stage starts
    # from a model that never had a gate): the gate keeps its initialisation.
    missing = [k for k in own if k not in full and not k.startswith("exit_gate.")]
    unexpected = [k for k in full if k not in own]
    if strict and (missing or unexpected):
        raise KeyError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    local = {}
    for name, target in own.items():
        if name not in full:
            continue
        t = full[name]
        p = params.get(name)
        if world > 1 and p is not None and _is_sharded(p):
            t = shard_tensor(t, p.partition_dim, p.partition_stride, rank, world)
        if tuple(t.shape) != tuple(target.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} does not match the model's {tuple(target.shape)}.")
        local[name] = t.to(dtype=target.dtype)
    model.load_state_dict(local, strict=strict and not any(k.startswith("exit_gate.") and k not in full for k in own))
