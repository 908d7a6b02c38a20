"""The Loop-Residual GPT: embeddings, optional prelude, the loop stack, optional coda, tied LM head."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..parallel import (VocabParallelEmbedding, gather_from_tp_region, get_tensor_model_parallel_rank,
                        vocab_parallel_cross_entropy)
from .block import Block
from .exit import ExitGate, ExitRule, ExitStats, expected_exit_loss
from .kv_cache import KVCache
from .loop import LoopStack

IGNORE_INDEX = -100


def padding_masks(attention_mask: Optional[torch.Tensor], new_tokens: int, limit: Optional[int] = None
                  ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(attn_mask, positions, real) of a padded batch, or (None, None, None) when there is no padding.

    `attention_mask` [B, S] (bool or 0/1, 1 = real token) covers every key position of the forward: the
    cached ones, then the `new_tokens` being run. Rows may be padded anywhere (left padding is what cached
    generation uses). Returns
      attn_mask [B, 1, new, S] bool (True = attend): causal, offset by the S - new cached positions, real keys
                only, and each query may always see itself, so a pad query never has an empty row (no NaN);
      positions [B, new] long: a token's position counts the real tokens before it (cumsum(mask) - 1, 0 at
                leading pads, as Hugging Face does), so a left-padded row embeds exactly like the row alone;
      real      [B, new] bool: the new positions that are real tokens.
    An all-ones mask is no padding: (None, None, None), so the forward is bit-identical to passing no mask.
    With `limit`, raises ValueError when a row holds more real tokens than that (max_position_embeddings).
    """
    if attention_mask is None:
        return None, None, None
    mask = attention_mask.to(torch.bool)
    if mask.ndim != 2 or mask.shape[1] < new_tokens:
        raise ValueError(f"attention_mask must be [batch, keys] with keys >= the {new_tokens} new tokens, "
                         f"got shape {tuple(attention_mask.shape)}.")
    no_padding, longest = torch.stack([mask.all().long(), mask.sum(dim=1).max()]).tolist()  # one host sync
    if limit is not None and longest > limit:
        raise ValueError(f"a row of {longest} tokens exceeds model.max_position_embeddings ({limit}).")
    if no_padding:
        return None, None, None
    S, T = mask.shape[1], new_tokens
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, S - T:]
    rows = torch.arange(S - T, S, device=mask.device)[:, None]
    cols = torch.arange(S, device=mask.device)[None, :]
    attn_mask = ((cols <= rows)[None] & mask[:, None, :]) | (cols == rows)[None]  # [B, T, S]
    return attn_mask[:, None], positions, mask[:, S - T:]


class LoopGPT(nn.Module):
    """GPT-2 (pre-LN, GELU, learned positions, tied embeddings) whose middle is a LoopStack.

    forward(input_ids, labels) returns (logits, loss): `loss` is the mean token cross-entropy over labels
    that are not IGNORE_INDEX (None without labels), or with `loss_reduction="none"` the per-token
    cross-entropy [B, T] (0 at ignored labels; evaluation sums it for bits per byte); `logits` are the full-vocabulary logits (gathered
    over TP ranks, vocab padding removed), returned when no labels are given or `return_logits=True`.
    Padding: `attention_mask` [B, S] (1 = real token) over every key position (cached ones + input_ids) runs
    a padded batch: pad keys are masked out, positions count real tokens only (see `padding_masks`), pad
    positions are exited from the start (0 iterations in exit_stats), and each real position's logits equal
    its row's run alone; pads' own logits are meaningless and pad labels should be IGNORE_INDEX.
    The loop's depth is chosen per call (see model/loop.py): `num_loops` (r), `backprop_loops` (k, truncated
    backprop), `loop_depths` (a LongTensor [batch] of per-row depths), `no_grad_loops` (a common start of
    the graph across data-parallel ranks) and `state_generator` (a random initial state outside training). At inference `exit_criterion` (none|kl|entropy|gate) and
    `exit_threshold` stop each position separately (model/exit.py: criteria and the KV rule), `num_loops`
    being the cap; an `ExitStats` passed as `exit_stats` receives the iterations each position used. With
    `model.exit_gate` and labels in training the loss is the gate's expected loss over the exit distribution.
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
        # Ouro-style learned exit gate (model/exit.py); consumes no RNG, so the other weights do not change.
        self.exit_gate = ExitGate(cfg.hidden_size, cfg.layernorm_epsilon) if cfg.exit_gate else None
        self.exit_entropy_beta = 0.0  # training.exit_entropy_beta, set by configure_exit_training
        # Which of this rank's vocabulary rows are padding: fixed at construction, so the forward pass
        # neither rebuilds it nor syncs with the host to ask whether any exist. Not saved in checkpoints.
        start = get_tensor_model_parallel_rank() * self.wte.per_rank
        is_padding = torch.arange(start, start + self.wte.per_rank) >= cfg.vocab_size
        self.register_buffer("vocab_padding_mask", is_padding if bool(is_padding.any()) else None, persistent=False)

    # ------------------------------------------------------------------------------------------------
    def _embed(self, input_ids: torch.Tensor, kv_cache: Optional[KVCache],
               attention_mask: Optional[torch.Tensor] = None):
        """Token + position embeddings and the prelude: (e, the loop's input; the attention mask; the real
        positions), the last two None without padding (`padding_masks`)."""
        T = input_ids.shape[1]
        offset = 0
        if kv_cache is not None:
            kv_cache.begin()
            offset = kv_cache.seq_len
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (input_ids.shape[0], offset + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; this forward needs "
                                 f"[batch, cached + new] = [{input_ids.shape[0]}, {offset + T}].")
            attention_mask = attention_mask.to(input_ids.device)
        attn_mask, positions, real = padding_masks(attention_mask, T, self.cfg.max_position_embeddings)
        if positions is None:
            if offset + T > self.cfg.max_position_embeddings:
                raise ValueError(f"sequence of {offset + T} tokens exceeds model.max_position_embeddings "
                                 f"({self.cfg.max_position_embeddings}).")
            positions = torch.arange(offset, offset + T, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(positions)
        x = F.dropout(x, self.cfg.hidden_dropout, self.training)
        for block in self.prelude:
            x = block(x, kv_cache, attn_mask)
        return x, attn_mask, real

    def _coda(self, x: torch.Tensor, kv_cache, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        for block in self.coda:
            x = block(x, kv_cache, attn_mask)
        return x

    def hidden_states(self, input_ids: torch.Tensor, num_loops: Optional[int] = None,
                      kv_cache: Optional[KVCache] = None, *, backprop_loops: Optional[int] = None,
                      loop_depths: Optional[torch.Tensor] = None,
                      state_generator: Optional[torch.Generator] = None,
                      states: Optional[List[torch.Tensor]] = None,
                      no_grad_loops: Optional[int] = None,
                      attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final-LayerNorm hidden states [batch, seq, hidden] (fixed depth)."""
        x, attn_mask, _ = self._embed(input_ids, kv_cache, attention_mask)
        x = self.loop(x, num_loops=num_loops, kv_cache=kv_cache, backprop_loops=backprop_loops,
                      loop_depths=loop_depths, state_generator=state_generator, states=states,
                      no_grad_loops=no_grad_loops, attn_mask=attn_mask)
        x = self._coda(x, kv_cache, attn_mask)
        if kv_cache is not None:
            kv_cache.end(input_ids.shape[1])
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

    def exit_rule(self, exit_criterion: Optional[str] = None, exit_threshold: Optional[float] = None) -> Optional[ExitRule]:
        """The exit settings of a call (None = fixed depth); the model config's are the inference defaults."""
        training = self.training and torch.is_grad_enabled()
        criterion = exit_criterion or ("none" if training else self.cfg.exit_criterion)
        if criterion == "none":
            return None
        if training:
            raise ValueError("exit criteria apply at inference only (eval mode or torch.no_grad()).")
        if criterion == "gate" and self.exit_gate is None:
            raise ValueError("exit criterion 'gate' needs a model with an exit gate (model.exit_gate true).")
        return ExitRule(criterion, self.cfg.exit_threshold if exit_threshold is None else float(exit_threshold))

    def _adaptive_logits(self, input_ids, rule: ExitRule, num_loops, kv_cache, state_generator, exit_stats,
                         attention_mask=None):
        """This rank's logits with per-position exits (model/exit.py); pad positions count as exited."""
        x, attn_mask, real = self._embed(input_ids, kv_cache, attention_mask)
        if rule.decodes:  # the coda + head read the state out every iteration; outputs = exit iteration's
            readout = lambda s, kv: self.logits_parallel(self.ln_f(self._coda(s, kv, attn_mask)))  # noqa: E731
            logits = self.loop.adaptive(x, num_loops, kv_cache, rule, readout=readout, stats=exit_stats,
                                        state_generator=state_generator, attn_mask=attn_mask, real=real)
        else:
            s = self.loop.adaptive(x, num_loops, kv_cache, rule, gate=self.exit_gate, stats=exit_stats,
                                   state_generator=state_generator, attn_mask=attn_mask, real=real)
            logits = self.logits_parallel(self.ln_f(self._coda(s, kv_cache, attn_mask)))
        if kv_cache is not None:
            kv_cache.end(input_ids.shape[1])
        return logits

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                num_loops: Optional[int] = None, kv_cache: Optional[KVCache] = None,
                return_logits: Optional[bool] = None, backprop_loops: Optional[int] = None,
                loop_depths: Optional[torch.Tensor] = None,
                state_generator: Optional[torch.Generator] = None, exit_criterion: Optional[str] = None,
                exit_threshold: Optional[float] = None,
                exit_stats: Optional[ExitStats] = None,
                no_grad_loops: Optional[int] = None,
                loss_reduction: str = "mean",
                attention_mask: Optional[torch.Tensor] = None) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        rule = self.exit_rule(exit_criterion, exit_threshold)
        keep = None if labels is None else labels != IGNORE_INDEX
        safe_labels = None if labels is None else labels.masked_fill(~keep, 0)
        loss = None
        if rule is not None:
            if loop_depths is not None or backprop_loops:
                raise ValueError("exit criteria cannot be combined with loop_depths or backprop_loops.")
            logits_parallel = self._adaptive_logits(input_ids, rule, num_loops, kv_cache, state_generator, exit_stats,
                                                    attention_mask)
        elif self.exit_gate is not None and labels is not None and self.training and torch.is_grad_enabled():
            # The exit gate's objective: the expected loss over the exit distribution (model/exit.py).
            states: List[torch.Tensor] = []
            self.hidden_states(input_ids, num_loops=num_loops, kv_cache=kv_cache, backprop_loops=backprop_loops,
                               loop_depths=loop_depths, state_generator=state_generator, states=states,
                               no_grad_loops=no_grad_loops, attention_mask=attention_mask)
            T = input_ids.shape[1]  # the readout's coda runs without the cache: its keys are the T new ones
            coda_mask = padding_masks(None if attention_mask is None else attention_mask[:, -T:], T)[0]
            losses, lambdas = [], []
            for s in states:
                logits_parallel = self.logits_parallel(self.ln_f(self._coda(s, None, coda_mask)))
                losses.append(vocab_parallel_cross_entropy(logits_parallel, safe_labels))
                lambdas.append(self.exit_gate(s))
            loss = expected_exit_loss(torch.stack(losses), torch.stack(lambdas), keep, self.exit_entropy_beta,
                                      loop_depths)
        else:
            hidden = self.hidden_states(input_ids, num_loops=num_loops, kv_cache=kv_cache,
                                        backprop_loops=backprop_loops, loop_depths=loop_depths,
                                        state_generator=state_generator, no_grad_loops=no_grad_loops,
                                        attention_mask=attention_mask)
            logits_parallel = self.logits_parallel(hidden)
        if labels is not None and loss is None:
            per_token = vocab_parallel_cross_entropy(logits_parallel, safe_labels)
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
