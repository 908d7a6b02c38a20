"""The GPT-2 transformer block (pre-LayerNorm) and its MLP."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..parallel import ColumnParallelLinear, RowParallelLinear, dropout
from .attention import CausalSelfAttention
from .kv_cache import KVCache


class MLP(nn.Module):
    """Column-parallel expansion, GELU (GPT-2's tanh approximation), row-parallel projection."""

    def __init__(self, cfg: ModelConfig, output_std: float):
        super().__init__()
        std = cfg.init_method_std
        self.fc = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_size, init_fn=lambda w: nn.init.normal_(w, std=std))
        self.proj = RowParallelLinear(cfg.ffn_size, cfg.hidden_size,
                                      init_fn=lambda w: nn.init.normal_(w, std=output_std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """x + attn(ln1(x)), then + mlp(ln2(x)); residual-branch dropout on replicated activations (on sequence
    shards with `sequence_parallel`: each TP rank its own dropout stream)."""

    sequence_parallel = False

    def __init__(self, cfg: ModelConfig, output_std: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.attn = CausalSelfAttention(cfg, output_std)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = MLP(cfg, output_std)
        self.dropout = cfg.hidden_dropout

    def forward(self, x: torch.Tensor, kv_cache: Optional[KVCache] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        sharded = self.sequence_parallel and self.training
        x = x + dropout(self.attn(self.ln_1(x), kv_cache, attn_mask), self.dropout, self.training, sharded)
        x = x + dropout(self.mlp(self.ln_2(x)), self.dropout, self.training, sharded)
        return x
