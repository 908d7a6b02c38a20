"""The loop stack: K shared blocks iterated N times with learned per-iteration gates.

    x(n) = x(n-1) + a_n * (Blocks(x(n-1)) - x(n-1)),   n = 1..N

where Blocks applies each of the K blocks M times in place ("inner loops"). With gates 'none' (a_n = 1)
this is exactly an unrolled N*K*M-layer GPT-2 whose layers repeat the shared blocks. This module is the
one place that knows about iterations, gates, inner loops and activation checkpointing.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .block import Block
from .kv_cache import KVCache


class LoopStack(nn.Module):
    """K shared blocks, N outer iterations, M inner repeats per block, gates a_1..a_N."""

    def __init__(self, cfg: ModelConfig, output_std: float):
        super().__init__()
        self.num_loops = cfg.num_loops
        self.inner_loops = cfg.inner_loops
        self.checkpointing = cfg.activation_checkpointing
        self.blocks = nn.ModuleList([Block(cfg, output_std) for _ in range(cfg.num_layers)])
        if cfg.loop_gates == "vector":
            self.gates = nn.Parameter(torch.full((cfg.num_loops, cfg.hidden_size), cfg.gate_init))
        elif cfg.loop_gates == "scalar":
            self.gates = nn.Parameter(torch.full((cfg.num_loops, 1), cfg.gate_init))
        else:
            self.register_parameter("gates", None)

    def gate(self, n: int) -> Optional[torch.Tensor]:
        """Gate of iteration n (0-based). Iterations beyond the trained count (evaluating with more
        loops than trained) reuse the last trained gate."""
        if self.gates is None:
            return None
        return self.gates[min(n, self.gates.shape[0] - 1)]

    def _apply_block(self, block: Block, h: torch.Tensor, kv_cache: Optional[KVCache]) -> torch.Tensor:
        if self.checkpointing == "per-block" and self._checkpoint_active(kv_cache):
            return checkpoint(block, h, use_reentrant=False)
        return block(h, kv_cache)

    def iteration(self, x: torch.Tensor, n: int, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """One outer iteration: x + a_n * (Blocks(x) - x)."""
        h = x
        for block in self.blocks:
            for _ in range(self.inner_loops):
                h = self._apply_block(block, h, kv_cache)
        a = self.gate(n)
        return h if a is None else x + a * (h - x)

    def _checkpoint_active(self, kv_cache: Optional[KVCache]) -> bool:
        return self.training and kv_cache is None and torch.is_grad_enabled()

    def forward(self, x: torch.Tensor, num_loops: Optional[int] = None,
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        for n in range(num_loops or self.num_loops):
            if self.checkpointing == "per-iteration" and self._checkpoint_active(kv_cache):
                # Non-reentrant: the shared weights get one gradient per iteration, which the reentrant
                # variant (and deepspeed.checkpointing) mishandle under ZeRO-2/3.
                x = checkpoint(self.iteration, x, n, use_reentrant=False)
            else:
                x = self.iteration(x, n, kv_cache)
        return x
