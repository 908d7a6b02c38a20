"""TP-aware randomness for dropout.

Activations replicated across TP ranks (the residual stream) must see the *same* dropout mask on every
TP rank, so they use the ordinary RNG, seeded identically on all TP ranks. Activations that are sharded
(attention probabilities of this rank's heads) must see *different* masks per rank, or the heads of
rank 0 and rank 1 would drop the same positions, which a TP=1 model never does.

`tp_rng_fork()` gives the sharded region its own stream without keeping extra RNG state: it draws a
seed from the ordinary RNG (same draw on every TP rank), adds the TP rank, and runs the region under a
forked generator. Because the seed comes from the ordinary RNG, torch.utils.checkpoint's RNG replay
makes the recomputed region draw exactly the same masks (a stateful Megatron-style tracker would need
its own checkpoint function for that).

Under sequence parallelism the residual stream itself is sharded (each TP rank holds other positions), so
its dropout runs under `tp_rng_fork` too (`dropout(..., sequence_sharded=True)`), while random tensors that
must equal the TP=1 run's (the loop's random initial state) are drawn whole from the shared RNG and then cut
to this rank's positions (`randn_like`).
"""
from __future__ import annotations

import contextlib
import random
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

_TP_SEED_OFFSET = 2718


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) identically; the same seed on all TP ranks."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def tp_rng_fork():
    """Run the block under a per-TP-rank random stream (identity at TP=1)."""
    if get_tensor_model_parallel_world_size() == 1:
        yield
        return
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item()) + _TP_SEED_OFFSET + get_tensor_model_parallel_rank()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def dropout(x: torch.Tensor, p: float, training: bool, sequence_sharded: bool = False) -> torch.Tensor:
    """F.dropout(x, p, training); on sequence shards (sequence parallelism) under this TP rank's own stream,
    so the ranks' shards do not repeat one mask."""
    if not training or p == 0.0:
        return x
    if not sequence_sharded:
        return F.dropout(x, p, True)
    with tp_rng_fork():
        return F.dropout(x, p, True)


def randn_like(x: torch.Tensor, sequence_sharded: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard normal noise shaped like `x`, from `generator` (on its device) or the shared RNG (on x's device).
    When `x` is a sequence shard ([batch, seq / TP, ...], sequence parallelism) the whole sequence is drawn, the
    same on every TP rank, and this rank's slice returned: the noise the TP=1 model draws for these positions."""
    world = get_tensor_model_parallel_world_size() if sequence_sharded else 1
    shape = (x.shape[0], x.shape[1] * world) + tuple(x.shape[2:])
    device = generator.device if generator is not None else x.device
    noise = torch.randn(shape, generator=generator, dtype=x.dtype, device=device)
    return noise if world == 1 else noise.chunk(world, dim=1)[get_tensor_model_parallel_rank()].contiguous()
