"""The Loop-Residual GPT: embeddings, optional prelude, the loop stack, optional coda, tied LM head."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..parallel import (VocabParallelEmbedding, gather_from_tp_region, get_tensor_model_parallel_rank,
                        vocab_parallel_cross_entropy)
from .block import Block
from .kv_cache import KVCache
from .loop import LoopStack

IGNORE_INDEX = -100


class LoopGPT(nn.Module):
    """GPT-2 (pre-LN, GELU, learned positions, tied embeddings) whose middle is a LoopStack.

    forward(input_ids, labels) returns (logits, loss): `loss` is the mean token cross-entropy over labels
    that are not IGNORE_INDEX (None without labels), or with `loss_reduction="none"` the per-token
    cross-entropy [B, T] (0 at ignored labels; evaluation sums it for bits per byte); `logits` are the full-vocabulary logits (gathered
    over TP ranks, vocab padding removed), returned when no labels are given or `return_logits=True`.
    The loop's depth is chosen per call (see model/loop.py): `num_loops` (r), `backprop_loops` (k, truncated
    backprop), `loop_depths` (a LongTensor [batch] of per-row depths) and `state_generator` (a random
    initial state outside training).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        std = cfg.init_method_std
        # GPT-2's scaled init: each residual branch's output projection shrinks with the number of
        # residual additions, which for a looped model is 2 per *applied* block (effective depth).
        output_std = std / math.sqrt(2 * cfg.effective_depth)
        self.wte = VocabParallelEmbedding(cfg.padded_vocab_size, cfg.hidden_size,
                                          init_fn=lambda w: nn.init.normal_(w, std=std))
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        nn.init.normal_(self.wpe.weight, std=std)
        self.prelude = nn.ModuleList([Block(cfg, output_std) for _ in range(cfg.prelude_layers)])
        self.loop = LoopStack(cfg, output_std)
        self.coda = nn.ModuleList([Block(cfg, output_std) for _ in range(cfg.coda_layers)])
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        # Which of this rank's vocabulary rows are padding: fixed at construction, so the forward pass
        # neither rebuilds it nor syncs with the host to ask whether any exist. Not saved in checkpoints.
        start = get_tensor_model_parallel_rank() * self.wte.per_rank
        is_padding = torch.arange(start, start + self.wte.per_rank) >= cfg.vocab_size
        self.register_buffer("vocab_padding_mask", is_padding if bool(is_padding.any()) else None, persistent=False)

    # ------------------------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, num_loops: Optional[int] = None,
                      kv_cache: Optional[KVCache] = None, *, backprop_loops: Optional[int] = None,
                      loop_depths: Optional[torch.Tensor] = None,
                      state_generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Final-LayerNorm hidden states [batch, seq, hidden]."""
        T = input_ids.shape[1]
        offset = 0
        if kv_cache is not None:
            kv_cache.begin()
            offset = kv_cache.seq_len
        if offset + T > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {offset + T} tokens exceeds model.max_position_embeddings "
                             f"({self.cfg.max_position_embeddings}).")
        positions = torch.arange(offset, offset + T, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(positions)
        x = F.dropout(x, self.cfg.hidden_dropout, self.training)
        for block in self.prelude:
            x = block(x, kv_cache)
        x = self.loop(x, num_loops=num_loops, kv_cache=kv_cache, backprop_loops=backprop_loops,
                      loop_depths=loop_depths, state_generator=state_generator)
        for block in self.coda:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.end(T)
        return self.ln_f(x)

    def logits_parallel(self, hidden: torch.Tensor) -> torch.Tensor:
        """This TP rank's vocabulary slice of the logits with no vocab padding in play. At TP=1 only the
        real rows take part (a contiguous view of the table: no padding columns, no mask pass, so the
        logits are vocab_size wide); at TP>1 the rank that owns padding sets those columns to -inf."""
        if self.vocab_padding_mask is None:
            return self.wte.logits_parallel(hidden)
        if self.wte.per_rank == self.wte.num_embeddings:
            return F.linear(hidden, self.wte.weight[:self.cfg.vocab_size])
        return self.wte.logits_parallel(hidden).masked_fill(self.vocab_padding_mask, float("-inf"))

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                num_loops: Optional[int] = None, kv_cache: Optional[KVCache] = None,
                return_logits: Optional[bool] = None, backprop_loops: Optional[int] = None,
                loop_depths: Optional[torch.Tensor] = None,
                state_generator: Optional[torch.Generator] = None,
                loss_reduction: str = "mean") -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        hidden = self.hidden_states(input_ids, num_loops=num_loops, kv_cache=kv_cache, backprop_loops=backprop_loops,
                                    loop_depths=loop_depths, state_generator=state_generator)
        logits_parallel = self.logits_parallel(hidden)
        loss = None
        if labels is not None:
            keep = labels != IGNORE_INDEX
            per_token = vocab_parallel_cross_entropy(logits_parallel, labels.masked_fill(~keep, 0))
            loss = per_token * keep
            if loss_reduction == "mean":
                loss = loss.sum() / keep.sum().clamp(min=1)
            elif loss_reduction != "none":
                raise ValueError(f"loss_reduction must be 'mean' or 'none', got {loss_reduction!r}")
        if return_logits is None:
            return_logits = labels is None
        logits = gather_from_tp_region(logits_parallel)[..., :self.cfg.vocab_size] if return_logits else None
        return logits, loss

    # ------------------------------------------------------------------------------------------------
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters on this rank (shared loop weights counted once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n

    def no_decay_parameter_names(self):
        """Parameters AdamW should not decay: biases, LayerNorm weights, loop gates and the injection's
        parameters (their init, e.g. W = [I I], is a meaningful operating point, not a small random one)."""
        names = []
        for name, p in self.named_parameters():
            if p.ndim < 2 or name.endswith("gates") or name.startswith("loop.injection."):
                names.append(name)
        return names
