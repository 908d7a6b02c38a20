"""Autograd functions that move activations into and out of the tensor-parallel region.

The usual Megatron four, each the other's adjoint:
  copy_to_tp_region      forward identity,        backward all-reduce
  reduce_from_tp_region  forward all-reduce,      backward identity
  gather_from_tp_region  forward all-gather(last dim), backward split
  scatter_to_tp_region   forward split(last dim), backward all-gather
With a TP group of one they are all identities.

Sequence parallelism (Korthikanti et al. 2022) adds three more along the sequence dimension (dim 1 of a
[batch, seq, hidden] tensor), for the regions where the residual stream lives as one sequence shard per TP rank:
  scatter_to_sequence_parallel_region      forward split(seq),          backward all-gather(seq)
  gather_from_sequence_parallel_region     forward all-gather(seq),     backward reduce-scatter(seq)
  reduce_scatter_to_sequence_parallel_region forward reduce-scatter(seq), backward all-gather(seq)
The gather replaces copy_to_tp_region in front of a column-parallel layer (which fuses it with its matmul so
that only the shard is stored for the backward, parallel/layers.py), the reduce-scatter replaces the
all-reduce after a row-parallel layer: the same bytes move, and what lies between them is 1/TP the size.
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


# ------------------------------------------------------------------------------------------------------
# Sequence parallelism: the same collectives along the sequence (dim 1 of [batch, seq, hidden]).
# ------------------------------------------------------------------------------------------------------
SEQUENCE_DIM = 1
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # torch >= 2.13's name


def _sequence_length(x: torch.Tensor, world: int) -> int:
    length = x.shape[SEQUENCE_DIM]
    if length % world != 0:
        raise ValueError(f"sequence parallelism needs the sequence length ({length}) divisible by "
                         f"parallel.tensor_model_parallel_size ({world}).")
    return length


def _split_sequence(x: torch.Tensor) -> torch.Tensor:
    world = get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    _sequence_length(x, world)
    return x.chunk(world, dim=SEQUENCE_DIM)[get_tensor_model_parallel_rank()].contiguous()


def _gather_sequence(x: torch.Tensor) -> torch.Tensor:
    world = get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    x = x.contiguous()
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)  # rank-major
    dist.all_gather_into_tensor(out, x, group=get_tensor_model_parallel_group())
    return torch.cat(out.chunk(world, dim=0), dim=SEQUENCE_DIM)


def _reduce_scatter_sequence(x: torch.Tensor) -> torch.Tensor:
    world = get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    length = _sequence_length(x, world)
    stacked = torch.cat(x.chunk(world, dim=SEQUENCE_DIM), dim=0)  # rank-major along dim 0, contiguous
    out = torch.empty((x.shape[0], length // world) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    _REDUCE_SCATTER(out, stacked, group=get_tensor_model_parallel_group())
    return out


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_sequence(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_sequence(grad)


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather_sequence(x)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_sequence(grad)


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter_sequence(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_sequence(grad)


def scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """This rank's sequence shard of a TP-replicated [batch, seq, ...] tensor (backward: all-gather)."""
    return x if get_tensor_model_parallel_world_size() == 1 else _ScatterToSequence.apply(x)


def gather_from_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """The full sequence from every rank's shard, for a TP-sharded consumer (a column-parallel layer, the
    vocab-parallel LM head), whose input gradient is one partial sum per rank: the backward reduce-scatters."""
    return x if get_tensor_model_parallel_world_size() == 1 else _GatherFromSequence.apply(x)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Sum the TP ranks' partial [batch, seq, ...] outputs and keep this rank's sequence shard (backward:
    all-gather)."""
    return x if get_tensor_model_parallel_world_size() == 1 else _ReduceScatterToSequence.apply(x)
