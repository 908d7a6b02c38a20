"""Causal self-attention with heads split over tensor-parallel ranks.

The fused q/k/v projection is column-parallel with stride 3 (its full weight is [q; k; v] as in GPT-2,
and each rank holds the q, k and v rows of its own heads); the output projection is row-parallel.
Attention itself runs through flash-attn when it is installed and the tensors are fp16/bf16 on a CUDA
device, and through PyTorch's scaled_dot_product_attention otherwise. A padded batch passes `attn_mask`, a
bool [batch, 1, new, all keys] mask (True = attend) that the model builds once per forward
(`padding_attention_mask` in model/gpt.py: causal, cache offset, padding); it always goes through SDPA. It is
per batch row and identical on every TP rank (heads are sharded, rows are not), so nothing is sharded.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..parallel import ColumnParallelLinear, RowParallelLinear, get_tensor_model_parallel_world_size, tp_rng_fork
from .kv_cache import KVCache

try:  # optional GPU fast path
    from flash_attn import flash_attn_func  # type: ignore
except Exception:  # ImportError, or a CUDA/ABI mismatch in the installed wheel
    flash_attn_func = None


def flash_attention_available() -> bool:
    return flash_attn_func is not None


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (this rank's heads)."""

    def __init__(self, cfg: ModelConfig, output_std: float):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.local_heads = cfg.num_attention_heads // tp
        self.local_width = self.local_heads * self.head_dim
        self.dropout_p = cfg.attention_dropout
        self.backend = cfg.attention_backend
        std = cfg.init_method_std
        self.qkv = ColumnParallelLinear(cfg.hidden_size, 3 * cfg.hidden_size, stride=3,
                                        init_fn=lambda w: nn.init.normal_(w, std=std))
        self.proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size,
                                      init_fn=lambda w: nn.init.normal_(w, std=output_std))

    def _use_flash(self, q: torch.Tensor, kv_cache: Optional[KVCache], attn_mask: Optional[torch.Tensor]) -> bool:
        if self.backend == "sdpa" or kv_cache is not None or attn_mask is not None or flash_attn_func is None:
            return False
        return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)

    def forward(self, x: torch.Tensor, kv_cache: Optional[KVCache] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = self.qkv(x).split(self.local_width, dim=-1)
        B, T, _ = q.shape  # the whole sequence, also when x is a sequence shard (sequence parallelism)
        q, k, v = (t.view(B, T, self.local_heads, self.head_dim) for t in (q, k, v))
        dropout_p = self.dropout_p if self.training else 0.0
        # Attention probabilities are sharded by head: give each TP rank its own dropout stream.
        with tp_rng_fork() if dropout_p > 0 else contextlib.nullcontext():
            if self._use_flash(q, kv_cache, attn_mask):
                y = flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
            else:
                y = self._sdpa(q, k, v, dropout_p, kv_cache, attn_mask)
        return self.proj(y.reshape(B, T, self.local_width))

    def _sdpa(self, q, k, v, dropout_p: float, kv_cache: Optional[KVCache],
              attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, head_dim]
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        T, S = q.shape[2], k.shape[2]
        if attn_mask is not None:  # padding (the causal and cache-offset parts are already in it)
            if attn_mask.shape[-2:] != (T, S):
                raise ValueError(f"attention mask covers {tuple(attn_mask.shape[-2:])} (queries, keys) but "
                                 f"attention has {T} queries and {S} keys.")
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        elif S == T:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1:  # one new token attends to everything cached
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:  # a chunk appended to a cache: causal, offset by the cached length
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return y.transpose(1, 2)

