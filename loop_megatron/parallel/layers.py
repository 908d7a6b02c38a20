"""Megatron-style tensor-parallel layers.

Each layer first builds the *full* (TP=1) weight with the caller's init function, from the same RNG
stream on every TP rank, and keeps only its shard. A TP=2 model therefore starts from exactly the
weights of the TP=1 model built with the same seed, which is what makes TP=2 vs TP=1 comparisons exact.

Sharded parameters carry Megatron's attributes (`tensor_model_parallel`, `partition_dim`,
`partition_stride`) so DeepSpeed counts them per rank in gradient norms and so checkpoint tools know
how to merge shards. `partition_stride` > 1 means the full tensor is a concatenation of `stride`
logical blocks along `partition_dim` (q, k, v in the fused attention projection), each sharded
separately: shard r = cat(block_0[r], block_1[r], ...).

Sequence parallelism (`enable_sequence_parallel`, Megatron's `--sequence-parallel`): in training mode the
residual stream between the TP layers is this rank's 1/TP slice of the sequence. The column-parallel layers
then all-gather their input along the sequence (backward: reduce-scatter) instead of copying it, and keep
only the shard for the backward, which gathers it again (`_SequenceGatherLinear`); the
row-parallel layers reduce-scatter their output along the sequence (backward: all-gather) instead of
all-reducing it, and the replicated parameters applied to sequence shards in between (LayerNorms, the
row-parallel biases, loop gates, injection weights) are marked `sequence_parallel` and get their gradient
summed over the TP group, because each rank only saw its own positions.
"""
from __future__ import annotations

import weakref
from typing import Callable, Iterable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mappings import (_all_reduce, _gather_sequence, _reduce_scatter_sequence, copy_to_tp_region,
                       gather_from_tp_region, reduce_from_tp_region, reduce_scatter_to_sequence_parallel_region)
from .state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

InitFn = Callable[[torch.Tensor], None]


def shard_tensor(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    """This rank's shard of `full` along `dim` (see module docstring for `stride`)."""
    if world == 1:
        return full
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(world, dim=dim)[rank] for b in blocks], dim=dim).contiguous()


def merge_shards(shards: List[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of `shard_tensor` over all ranks: the full tensor from every rank's shard."""
    if len(shards) == 1:
        return shards[0]
    per_rank_blocks = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([torch.cat([blocks[i] for blocks in per_rank_blocks], dim=dim) for i in range(stride)], dim=dim)


class _SequenceGatherLinear(torch.autograd.Function):
    """y = all-gather_seq(x) A^T + b that keeps only the sequence shard x for the backward and gathers it again
    there (Megatron's column-parallel linear under sequence parallelism): the gathered input, TP times the
    shard, is never stored. Backward: dx = reduce-scatter_seq(dy A), dA = dy^T x_full, db = sum dy."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(_gather_sequence(x), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad  # the same on every TP rank
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_input = _reduce_scatter_sequence(grad.matmul(weight)) if need_input else None
        grad_weight = None
        if need_weight:
            full = _gather_sequence(x)
            grad_weight = grad2d.t().matmul(full.reshape(-1, full.shape[-1]))
        return grad_input, grad_weight, (grad2d.sum(0) if ctx.has_bias and need_bias else None)


def _mark_parallel(param: nn.Parameter, dim: int, stride: int) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = stride


def _sharded_parameter(shape, dim: int, stride: int, init_fn: InitFn) -> nn.Parameter:
    full = torch.empty(shape)
    init_fn(full)
    shard = shard_tensor(full, dim, stride, get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
    param = nn.Parameter(shard.clone())
    if get_tensor_model_parallel_world_size() > 1:
        _mark_parallel(param, dim, stride)
    else:
        # Keep the layout metadata even at TP=1 so checkpoint tools can describe the tensor.
        param.partition_dim, param.partition_stride = dim, stride
    return param


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by output rows: each TP rank computes a slice of the outputs.

    Input is replicated across TP ranks; output stays sharded (the next RowParallelLinear consumes it)
    unless `gather_output`. At TP=1 this is nn.Linear. With `sequence_parallel` (set by
    enable_sequence_parallel) the input is this rank's sequence shard in training mode, all-gathered here.
    """

    sequence_parallel = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 init_fn: Optional[InitFn] = None, stride: int = 1):
        super().__init__()
        world = get_tensor_model_parallel_world_size()
        assert out_features % (world * stride) == 0, "output features must divide evenly over TP ranks"
        self.in_features, self.out_features = in_features, out_features
        self.gather_output = gather_output
        init_fn = init_fn or (lambda w: nn.init.normal_(w, std=0.02))
        self.weight = _sharded_parameter((out_features, in_features), 0, stride, init_fn)
        if bias:
            self.bias = _sharded_parameter((out_features,), 0, stride, nn.init.zeros_)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel and self.training:
            y = _SequenceGatherLinear.apply(x, self.weight, self.bias)
        else:
            y = F.linear(copy_to_tp_region(x), self.weight, self.bias)
        return gather_from_tp_region(y) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by input columns: each rank holds a slice of the inputs.

    The partial products are summed over the TP group; the bias is replicated and added once after the
    reduction. At TP=1 this is nn.Linear. With `sequence_parallel` (set by enable_sequence_parallel) the sum
    is a reduce-scatter along the sequence in training mode: each rank keeps its sequence shard of the output.
    """

    sequence_parallel = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_fn: Optional[InitFn] = None):
        super().__init__()
        world = get_tensor_model_parallel_world_size()
        assert in_features % world == 0, "input features must divide evenly over TP ranks"
        self.in_features, self.out_features = in_features, out_features
        init_fn = init_fn or (lambda w: nn.init.normal_(w, std=0.02))
        self.weight = _sharded_parameter((out_features, in_features), 1, 1, init_fn)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if get_tensor_model_parallel_world_size() == 1:
            return F.linear(x, self.weight, self.bias)  # one fused addmm, as nn.Linear
        y = F.linear(x, self.weight)
        if self.sequence_parallel and self.training:
            y = reduce_scatter_to_sequence_parallel_region(y)
        else:
            y = reduce_from_tp_region(y)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose rows (the vocabulary) are split over TP ranks.

    Each rank looks up the ids that fall in its range, zeroes the rest, and the TP all-reduce assembles
    the full embedding. The same weight serves as the tied output layer (`logits_parallel`), which with
    `sequence_parallel` (training mode) all-gathers its sequence-sharded input as a column-parallel layer does.
    """

    sequence_parallel = False

    def __init__(self, num_embeddings: int, embedding_dim: int, init_fn: Optional[InitFn] = None):
        super().__init__()
        world, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        assert num_embeddings % world == 0, "vocabulary must divide evenly over TP ranks"
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.per_rank = num_embeddings // world
        self.vocab_start = rank * self.per_rank
        init_fn = init_fn or (lambda w: nn.init.normal_(w, std=0.02))
        self.weight = _sharded_parameter((num_embeddings, embedding_dim), 0, 1, init_fn)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if get_tensor_model_parallel_world_size() == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp_region(out)

    def logits_parallel(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied output layer: this rank's slice of the vocabulary logits."""
        if self.sequence_parallel and self.training:
            return _SequenceGatherLinear.apply(hidden, self.weight, None)
        return F.linear(copy_to_tp_region(hidden), self.weight)


def _tp_sum_hook(model: nn.Module):
    owner = weakref.ref(model)

    def hook(grad: torch.Tensor) -> torch.Tensor:
        module = owner()
        if module is None or not module.training:  # eval-mode forwards never shard the sequence
            return grad
        return _all_reduce(grad.clone())

    return hook


def enable_sequence_parallel(model: nn.Module, replicated: Iterable[nn.Parameter]) -> List[nn.Parameter]:
    """Switch `model` to sequence parallelism for its training-mode forwards (TP > 1; at TP=1 nothing
    changes and [] is returned): every submodule with a `sequence_parallel` attribute gets True, and each
    parameter in `replicated` (replicated parameters applied to sequence shards) is marked
    `sequence_parallel` and gets a gradient hook summing its gradient over the TP group.

    The hook runs before the gradient reaches the parameter's accumulator, so DeepSpeed (ZeRO 0-3 alike:
    its own hooks fire on accumulation) only ever sees the whole gradient, identical on every TP rank; autograd
    calls it once per backward pass with the sum over all of the parameter's uses (every loop iteration), so
    it costs one small all-reduce per such parameter per micro-batch. It sums only while `model` is in
    training mode, the only mode that shards the sequence."""
    if get_tensor_model_parallel_world_size() == 1:
        return []
    for module in model.modules():
        if hasattr(module, "sequence_parallel"):
            module.sequence_parallel = True
    marked = []
    for param in replicated:
        if getattr(param, "tensor_model_parallel", False):
            raise ValueError("enable_sequence_parallel: a TP-sharded parameter was passed as replicated.")
        if getattr(param, "sequence_parallel", False):
            continue
        param.sequence_parallel = True
        param.register_hook(_tp_sum_hook(model))
        marked.append(param)
    return marked
