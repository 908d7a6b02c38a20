"""Moving between tensor-parallel shards and the full (TP=1) state dict.

A TP=1 state dict is the project's interchange format: checkpoints store it consolidated, the Hugging
Face converter reads it, and tests compare TP=2 against TP=1 through it. Sharded parameters describe
their own layout through `partition_dim` / `partition_stride` (set by the parallel layers).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..parallel import (get_tensor_model_parallel_group, get_tensor_model_parallel_rank,
                        get_tensor_model_parallel_world_size, merge_shards, shard_tensor)


def _is_sharded(p: torch.Tensor) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def merge_tp_tensor(t: torch.Tensor, param: Optional[torch.Tensor]) -> torch.Tensor:
    """The full (TP=1) tensor of this rank's shard `t` of `param` (or `t` itself when `param` is not
    TP-sharded). Collective over the TP group when it is. `t` may be the weight or any tensor laid out
    like it (an fp32 master copy, an optimizer moment)."""
    world = get_tensor_model_parallel_world_size()
    if world == 1 or param is None or not _is_sharded(param):
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=get_tensor_model_parallel_group())
    return merge_shards(parts, param.partition_dim, param.partition_stride)


def shard_tp_tensor(full: torch.Tensor, param: Optional[torch.Tensor]) -> torch.Tensor:
    """This TP rank's shard of the full tensor `full` laid out like `param` (inverse of merge_tp_tensor)."""
    world = get_tensor_model_parallel_world_size()
    if world == 1 or param is None or not _is_sharded(param):
        return full
    return shard_tensor(full, param.partition_dim, param.partition_stride, get_tensor_model_parallel_rank(), world)


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The TP=1 state dict of `model` (fp32, CPU), gathered over the TP group. Collective over TP ranks.

    Parameters must be materialised (under ZeRO-3, call inside deepspeed.zero.GatheredParameters).
    """
    params = dict(model.named_parameters())
    out: Dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        out[name] = merge_tp_tensor(tensor.detach(), params.get(name)).float().cpu().clone()
    return out


def load_full_state_dict(model: nn.Module, full: Dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load a TP=1 state dict into a (possibly TP-sharded) model, keeping this rank's shard."""
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
        t = shard_tp_tensor(full[name], params.get(name))
        if tuple(t.shape) != tuple(target.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} does not match the model's {tuple(target.shape)}.")
        local[name] = t.to(dtype=target.dtype)
    model.load_state_dict(local, strict=strict and not any(k.startswith("exit_gate.") and k not in full for k in own))
