"""Autograd functions that move activations into and out of the tensor-parallel region.

The usual Megatron four, each the other's adjoint:
  copy_to_tp_region      forward identity,        backward all-reduce
  reduce_from_tp_region  forward all-reduce,      backward identity
  gather_from_tp_region  forward all-gather(last dim), backward split
  scatter_to_tp_region   forward split(last dim), backward all-gather
With a TP group of one they are all identities.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .state import get_tensor_model_parallel_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if get_tensor_model_parallel_world_size() == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=get_tensor_model_parallel_group())
    return x


def _split_last_dim(x: torch.Tensor) -> torch.Tensor:
    world = get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    chunk = x.shape[-1] // world
    rank = get_tensor_model_parallel_rank()
    return x[..., rank * chunk:(rank + 1) * chunk].contiguous()


def _gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    world = get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone())


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad)


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad)


def copy_to_tp_region(x: torch.Tensor) -> torch.Tensor:
    return x if get_tensor_model_parallel_world_size() == 1 else _CopyToTP.apply(x)


def reduce_from_tp_region(x: torch.Tensor) -> torch.Tensor:
    return x if get_tensor_model_parallel_world_size() == 1 else _ReduceFromTP.apply(x)


def gather_from_tp_region(x: torch.Tensor) -> torch.Tensor:
    return x if get_tensor_model_parallel_world_size() == 1 else _GatherFromTP.apply(x)


def scatter_to_tp_region(x: torch.Tensor) -> torch.Tensor:
    return x if get_tensor_model_parallel_world_size() == 1 else _ScatterToTP.apply(x)
