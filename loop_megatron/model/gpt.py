"""The Loop-Residual GPT: embeddings, optional prelude, the loop stack, optional coda, tied LM head."""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..parallel import (VocabParallelEmbedding, dropout, enable_sequence_parallel, gather_from_tp_region,
                        get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                        scatter_to_sequence_parallel_region, vocab_parallel_cross_entropy)
from .block import Block
from .depth import DepthLike, LoopDepth
from .documents import DocumentMask
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
    cross-entropy [B, T] (0 at ignored labels; evaluation sums it for bits per byte); `logits` are the
    full-vocabulary logits (gathered over TP ranks, vocab padding removed), returned when no labels are given
    or `return_logits=True`.
    `depth`: how deep this call runs the loop, an int (iterations) or a `LoopDepth` (model/depth.py: iterations,
    truncated backprop, per-row depths, no-grad prefix, the first state's generator); None = model.num_loops.
    `exit_rule`: per-position exits at inference (model/exit.py: criteria and the KV rule; None = the config's
    exit_criterion outside training, `ExitRule("none")` = fixed depth), the depth's iterations being the cap;
    an `ExitStats` passed as `exit_stats` receives the iterations each position used.
    Packed documents: `attention_mask` may instead be a `DocumentMask` (model/documents.py, Megatron's
    reset_position_ids / reset_attention_mask): positions restart and attention stops at each document's
    start, for full-window forwards (no KV cache).
    Padding: `attention_mask` [B, S] (1 = real token) over every key position (cached ones + input_ids) runs
    a padded batch: pad keys are masked out, positions count real tokens only (see `padding_masks`), pad
    positions are exited from the start (0 iterations in exit_stats), and each real position's logits equal
    its row's run alone; pads' own logits are meaningless and pad labels should be IGNORE_INDEX.
    With `model.exit_gate` and labels in training the loss is the gate's expected loss over the exit
    distribution (`exit_gate_loss`); inference with an exit criterion runs `adaptive_logits`.
    `enable_sequence_parallel()` (parallel.sequence_parallel) shards the sequence over TP ranks in training mode.
    """

    sequence_parallel = False

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
        # On the CPU whatever the default device: a model built on the meta device (transformers' from_pretrained)
        # can still ask whether padding exists.
        is_padding = torch.arange(start, start + self.wte.per_rank, device="cpu") >= cfg.vocab_size
        self.register_buffer("vocab_padding_mask", is_padding if bool(is_padding.any()) else None, persistent=False)

    # ------------------------------------------------------------------------------------------------
    def _embed(self, input_ids: torch.Tensor, kv_cache: Optional[KVCache],
               attention_mask: Optional[torch.Tensor] = None):
        """Token + position embeddings and the prelude: (e, the loop's input; the attention mask; the real
        positions), the last two None without padding (`padding_masks`)."""
        if isinstance(attention_mask, DocumentMask):  # packed documents kept apart (model/documents.py)
            return self._embed_documents(input_ids, kv_cache, attention_mask)
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
        return self._embed_positions(input_ids, positions, kv_cache, attn_mask), attn_mask, real

    def _embed_documents(self, input_ids: torch.Tensor, kv_cache: Optional[KVCache], documents: DocumentMask):
        """`_embed` for a DocumentMask: positions within each document, attention within each document."""
        if kv_cache is not None:
            raise ValueError("a DocumentMask (packed documents) is for full-window forwards; generation runs one "
                             "document per row with a KV cache and a padding attention_mask instead.")
        B, T = input_ids.shape
        if T > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {T} tokens exceeds model.max_position_embeddings "
                             f"({self.cfg.max_position_embeddings}).")
        documents = documents.to(input_ids.device)
        for name, t in (("position_ids", documents.position_ids), ("document_ids", documents.document_ids)):
            if t is not None and tuple(t.shape) != (B, T):
                raise ValueError(f"DocumentMask.{name} has shape {tuple(t.shape)}; input_ids have {(B, T)}.")
        positions = documents.position_ids
        if positions is None:
            positions = torch.arange(T, device=input_ids.device)
        attn_mask = documents.attention()
        return self._embed_positions(input_ids, positions, None, attn_mask), attn_mask, None

    def _embed_positions(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: Optional[KVCache],
                         attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Token + position embeddings (sequence-sharded under sequence parallelism), dropout, the prelude."""
        x = self.wte(input_ids) + self.wpe(positions)
        sharded = self.sequence_parallel and self.training
        if sharded:  # from here to the LM head the residual stream is this TP rank's sequence shard
            if kv_cache is not None:
                raise ValueError("parallel.sequence_parallel shards the full-sequence training forward only; "
                                 "call model.eval() before a forward with a KV cache.")
            x = scatter_to_sequence_parallel_region(x)
        x = dropout(x, self.cfg.hidden_dropout, self.training, sharded)
        for block in self.prelude:
            x = block(x, kv_cache, attn_mask)
        return x

    def _coda(self, x: torch.Tensor, kv_cache, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        for block in self.coda:
            x = block(x, kv_cache, attn_mask)
        return x

    def hidden_states(self, input_ids: torch.Tensor, depth: DepthLike = None, kv_cache: Optional[KVCache] = None,
                      attention_mask: Optional[torch.Tensor] = None,
                      states: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """Final-LayerNorm hidden states [batch, seq, hidden] at a fixed `depth`; `states`, when given,
        receives the loop state after every iteration."""
        x, attn_mask, _ = self._embed(input_ids, kv_cache, attention_mask)
        x = self.loop(x, LoopDepth.of(depth), kv_cache, attn_mask, states)
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

    def resolve_exit(self, exit_rule: Optional[ExitRule] = None) -> Optional[ExitRule]:
        """The exit rule of a call with its threshold filled in, or None for a fixed depth: the model config's
        exit_criterion/exit_threshold are the inference defaults; training never exits."""
        training = self.training and torch.is_grad_enabled()
        criterion = exit_rule.criterion if exit_rule is not None else ("none" if training else self.cfg.exit_criterion)
        plain_kv = exit_rule is None or exit_rule.kv_share == "all"
        if criterion == "none" and plain_kv:
            return None
        if training:
            raise ValueError("exit criteria and KV sharing apply at inference only (eval mode or torch.no_grad()).")
        if criterion == "gate" and self.exit_gate is None:
            raise ValueError("exit criterion 'gate' needs a model with an exit gate (model.exit_gate true).")
        threshold = exit_rule.threshold if exit_rule is not None else None
        threshold = self.cfg.exit_threshold if threshold is None else float(threshold)
        if exit_rule is None:
            return ExitRule(criterion, threshold)
        return dataclasses.replace(exit_rule, criterion=criterion, threshold=threshold)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, *, depth: DepthLike = None,
                exit_rule: Optional[ExitRule] = None, kv_cache: Optional[KVCache] = None,
                attention_mask: Optional[torch.Tensor] = None, exit_stats: Optional[ExitStats] = None,
                return_logits: Optional[bool] = None,
                loss_reduction: str = "mean") -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        depth = LoopDepth.of(depth)
        rule = self.resolve_exit(exit_rule)
        if rule is None and kv_cache is not None and not (self.training and torch.is_grad_enabled()):
            rule = ExitRule("none")  # cached inference: the loop's slots are named by the iteration view
        loss = None
        if rule is not None:
            logits_parallel = self.adaptive_logits(input_ids, rule, depth, kv_cache, exit_stats, attention_mask)
        elif self.exit_gate is not None and labels is not None and self.training and torch.is_grad_enabled():
            logits_parallel, loss = self.exit_gate_loss(input_ids, labels, depth, attention_mask)
        else:
            logits_parallel = self.logits_parallel(self.hidden_states(input_ids, depth, kv_cache, attention_mask))
        if labels is not None and loss is None:
            loss = self.lm_loss(logits_parallel, labels, loss_reduction)
        if return_logits is None:
            return_logits = labels is None
        logits = gather_from_tp_region(logits_parallel)[..., :self.cfg.vocab_size] if return_logits else None
        return logits, loss

    def lm_loss(self, logits_parallel: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Token cross-entropy over labels that are not IGNORE_INDEX: their mean, or with reduction 'none'
        the per-token loss [B, T] with 0 at ignored labels."""
        keep = labels != IGNORE_INDEX
        loss = vocab_parallel_cross_entropy(logits_parallel, labels.masked_fill(~keep, 0)) * keep
        if reduction == "mean":
            return loss.sum() / keep.sum().clamp(min=1)
        if reduction != "none":
            raise ValueError(f"loss_reduction must be 'mean' or 'none', got {reduction!r}")
        return loss

    def adaptive_logits(self, input_ids: torch.Tensor, rule: ExitRule, depth: LoopDepth,
                        kv_cache: Optional[KVCache] = None, exit_stats: Optional[ExitStats] = None,
                        attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This rank's logits with per-position exits (model/exit.py), `depth` the cap; pads count as exited."""
        offset = kv_cache.seq_len if kv_cache is not None else 0
        x, attn_mask, real = self._embed(input_ids, kv_cache, attention_mask)
        head = lambda h: self.logits_parallel(self.ln_f(h))  # noqa: E731
        if rule.decodes:  # the coda + head read the state out every iteration; outputs = exit iteration's
            logits = self.loop.adaptive(x, depth, kv_cache, rule, coda=self._coda, head=head, stats=exit_stats,
                                        attn_mask=attn_mask, real=real, offset=offset)
        else:
            s = self.loop.adaptive(x, depth, kv_cache, rule, gate=self.exit_gate, stats=exit_stats,
                                   attn_mask=attn_mask, real=real, offset=offset)
            logits = head(self._coda(s, kv_cache, attn_mask))
        if kv_cache is not None:
            kv_cache.end(input_ids.shape[1])
        return logits

    def exit_gate_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, depth: LoopDepth,
                       attention_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The exit gate's training objective (model/exit.py): the expected LM loss over the exit distribution
        minus exit_entropy_beta times its entropy. Returns (the last iteration's logits slice, the loss)."""
        states: List[torch.Tensor] = []
        self.hidden_states(input_ids, depth, None, attention_mask, states)
        T = input_ids.shape[1]  # the readout's coda runs without a cache: its keys are the T new ones
        if isinstance(attention_mask, DocumentMask):
            coda_mask = attention_mask.to(input_ids.device).attention()
        else:
            coda_mask = padding_masks(None if attention_mask is None else attention_mask[:, -T:], T)[0]
        keep = labels != IGNORE_INDEX
        safe_labels = labels.masked_fill(~keep, 0)
        losses, lambdas = [], []
        for s in states:
            logits_parallel = self.logits_parallel(self.ln_f(self._coda(s, None, coda_mask)))
            losses.append(vocab_parallel_cross_entropy(logits_parallel, safe_labels))
            lambdas.append(self.exit_gate(s))
        loss = expected_exit_loss(torch.stack(losses), torch.stack(lambdas), keep, self.exit_entropy_beta,
                                  depth.loop_depths)
        return logits_parallel, loss

    def enable_sequence_parallel(self) -> List[str]:
        """Megatron's sequence parallelism for training-mode forwards (TP > 1; a no-op returning [] at TP=1):
        after the embeddings the residual stream is this rank's 1/TP of the sequence through the prelude, loop
        and coda (LayerNorm, dropout, gates, injection and residual adds on shards, the per-iteration
        checkpoints stored sharded); the column-parallel layers and the LM head all-gather it, the row-parallel
        layers reduce-scatter into it. Returns the names of the replicated parameters applied to shards, whose
        gradients are then summed over the TP group (parallel/layers.py `enable_sequence_parallel`)."""
        if self.exit_gate is not None and get_tensor_model_parallel_world_size() > 1:
            raise ValueError("parallel.sequence_parallel cannot train model.exit_gate (its loss reads every "
                             "iteration's state at all positions); turn one of them off.")
        before_scatter = (self.wte.weight, self.wpe.weight)  # the embeddings run on the whole sequence
        on_shards = {n: p for n, p in self.named_parameters()
                     if not getattr(p, "tensor_model_parallel", False) and all(p is not q for q in before_scatter)}
        return list(on_shards) if enable_sequence_parallel(self, on_shards.values()) else []

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
