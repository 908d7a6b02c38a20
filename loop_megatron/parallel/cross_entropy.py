"""Cross-entropy over vocabulary-sharded logits, without gathering the full vocabulary.

Each TP rank holds logits for its slice of the vocabulary. The max, the target logit and the softmax
denominator are each one all-reduce over the TP group; the backward pass (softmax minus one-hot) is
purely local. At TP=1 this is `F.cross_entropy`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .state import get_tensor_model_parallel_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor):
        group = get_tensor_model_parallel_group()
        per_rank = logits.shape[-1]
        vocab_start = get_tensor_model_parallel_rank() * per_rank
        logits = logits.float()

        # Subtract the global max for numerical stability.
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        logits = logits - logits_max.unsqueeze(-1)

        # The target's logit lives on exactly one rank; the others contribute zero.
        local_target = target - vocab_start
        outside = (local_target < 0) | (local_target >= per_rank)
        local_target = local_target.masked_fill(outside, 0)
        predicted = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(predicted, group=group)

        exp_logits = logits.exp()
        sum_exp = exp_logits.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - predicted

        softmax = exp_logits / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(softmax, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax
        one_hot = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -one_hot)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None


def vocab_parallel_cross_entropy(logits_parallel: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token loss (same shape as `target`) from this rank's vocabulary slice of the logits."""
    if get_tensor_model_parallel_world_size() == 1:
        flat = F.cross_entropy(logits_parallel.float().reshape(-1, logits_parallel.shape[-1]), target.reshape(-1),
                               reduction="none")
        return flat.view(target.shape)
    return _VocabParallelCrossEntropy.apply(logits_parallel, target)
