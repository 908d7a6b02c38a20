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
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

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
