"""Autoregressive sampling from a LoopGPT with a per-application KV cache.

The prompt is run once (prefill) into a `KVCache`, then one token per step; the cache keeps one slot per
block application, so it is correct across loop iterations and inner loops. `temperature=0` is greedy
(argmax); otherwise logits are divided by the temperature, optionally filtered by top-k and top-p
(nucleus), and sampled with a seeded generator.

Adaptive depth: `exit_criterion` (none|kl|entropy|gate) and `exit_threshold` stop each token's loop
separately (num_loops is then the cap); the cache follows the same "latest entry" KV rule as the
full-sequence forward (model/exit.py), so cached and recomputed generation agree.
`return_iterations=True` also returns the iterations each fed position used.

Batches of prompts of different lengths: `pad_prompts` pads them (left or right) and returns the attention
mask to pass as `generate(..., attention_mask=mask)`; see generate() for the layout and the padding rule.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..model import KVCache
from ..model.exit import ExitRule, ExitStats


@dataclass
class GenerationStats:
    """Out-parameter of `generate(..., stats=)`: where the time went and what the cache held."""

    prefill_seconds: float = 0.0
    """The first forward (the prompt)."""
    decode_seconds: float = 0.0
    """Every later forward plus sampling (one token per step)."""
    decode_steps: int = 0
    """Forwards after the prefill."""
    kv_cache_bytes: int = 0
    """Bytes of the KV cache's entries at the end (its peak: it only grows)."""


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose probability mass
    reaches top_p (the most likely token always survives). logits: [B, V]."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                      top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_token_id: int = 0, padding_side: str = "left"):
    """(ids [B, W], attention_mask [B, W]) for prompts of different lengths, W the longest: each row is its
    prompt with `pad_token_id` filling the `padding_side` ('left' or 'right'); the mask is 1 at real tokens."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    rows = [list(p) for p in prompts]
    if not rows or min(len(r) for r in rows) == 0:
        raise ValueError("every prompt needs at least one token.")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        cols = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        ids[b, cols] = torch.tensor(r, dtype=torch.long)
        mask[b, cols] = 1
    return ids, mask


def _padding_side(mask: torch.Tensor) -> str:
    """'left' when every row's pads come first, else 'right' when every row's pads come last."""
    if not bool(mask.any(dim=1).all()):
        raise ValueError("attention_mask has a row with no real token; every prompt needs at least one.")
    step = mask[:, 1:].long() - mask[:, :-1].long()
    if bool((step >= 0).all()):
        return "left"
    if bool((step <= 0).all()):
        return "right"
    raise ValueError("attention_mask must be left- or right-padded: each row's real tokens contiguous at one "
                     "end (mixing left- and right-padded rows is not supported).")


@torch.no_grad()
def generate(model, prompt: Union[torch.Tensor, Sequence[int]], max_new_tokens: int = 50, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, num_loops: Optional[int] = None,
             eos_token_id: Optional[int] = None, seed: Optional[int] = None, use_cache: bool = True,
             exit_criterion: Optional[str] = None, exit_threshold: Optional[float] = None,
             return_iterations: bool = False, attention_mask: Optional[torch.Tensor] = None,
             prefill: str = "exit", kv_share: str = "all", kv_budget: int = 1,
             stats: Optional[GenerationStats] = None):
    """Prompt plus continuation, LongTensor [B, T + new] (a 1-D prompt is treated as batch 1).
    With `return_iterations`, (ids, iterations): iterations [B, T + new - 1] holds the loop iterations each
    position that was run through the model used (the last token is sampled, never run).

    Stops after `max_new_tokens`, when every row has produced `eos_token_id`, or at the model's
    position limit (max_position_embeddings). Rows that finished early are padded with eos.
    `use_cache=False` recomputes the whole sequence each step (slow; a reference for the cache).

    Padded batches: prompts of different lengths go in as `prompt` [B, T] with `attention_mask` [B, T]
    (1 = real token, 0 = padding; `pad_prompts` builds both), left- or right-padded (the side is read from
    the mask; every row needs a real token). Generation runs left-padded (right-padded rows are shifted
    right first): a pad is masked out of attention and positions count real tokens only, so each row's
    continuation is the one its prompt gives alone. The output keeps the input's layout: left-padded rows are
    `prompt + continuation` as above; a right-padded row is its real tokens, its continuation, then its pad
    entries (their input values, moved to the end). `iterations` is aligned with the output's positions and
    is 0 at pads (in a right-padded row, also at the last sampled token, which is never run), so means over
    `iterations > 0` ignore them. An all-ones mask is the same as no mask. The position limit applies to
    each row's real tokens.

    Test-time compute (model/exit.py): `prefill` 'exit' (the prompt's tokens exit like every other token) or
    'full' (the prompt runs to the cap; only generated tokens test the criterion: ExitRule.fixed_prefix = the
    prompt's width, which the recompute path applies too, so cached = recomputed still holds). `kv_share`
    'all' | 'first' | 'last' (with `kv_budget` k) bounds the cache across iterations (ExitRule.kv_share).
    `stats`, a GenerationStats, receives prefill and decode times and the cache's size.
    """
    device = next(model.parameters()).device
    ids = torch.as_tensor(prompt, dtype=torch.long, device=device)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty; give at least one token.")
    mask, shift = None, None
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask, device=device)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, the prompt {tuple(ids.shape)}.")
        mask = mask.to(torch.bool)
        if _padding_side(mask) == "right":  # to left padding: a stable sort puts each row's pads first
            order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
            ids, mask = ids.gather(1, order), mask.gather(1, order)
            shift = (~mask).sum(dim=1)  # each row's pads, to move back to its end afterwards
        if bool(mask.all()):
            mask = None
    longest = ids.shape[1] if mask is None else int(mask.sum(dim=1).max())
    limit = model.cfg.max_position_embeddings
    if longest > limit:
        raise ValueError(f"the prompt has {longest} tokens, more than max_position_embeddings ({limit}).")
    max_new_tokens = max(0, min(max_new_tokens, limit - longest))
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    # None/None = the model config's exit setting; a threshold alone applies to the config's criterion.
    if prefill not in ("exit", "full"):
        raise ValueError(f"prefill must be 'exit' or 'full', got {prefill!r}.")
    rule = None
    if exit_criterion is not None or exit_threshold is not None or kv_share != "all" or prefill == "full":
        rule = ExitRule(exit_criterion or model.cfg.exit_criterion, exit_threshold,
                        fixed_prefix=ids.shape[1] if prefill == "full" else 0, kv_share=kv_share, kv_budget=kv_budget)
    was_training = model.training
    model.eval()
    try:
        cache = KVCache(capacity=ids.shape[1] + max_new_tokens) if use_cache else None
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        step_input = ids
        counts = []
        _sync(device)
        started = time.perf_counter()
        for step in range(max_new_tokens):
            exit_stats = ExitStats()
            fed = step_input if use_cache else ids
            logits, _ = model(fed, depth=num_loops, exit_rule=rule, kv_cache=cache, attention_mask=mask,
                              return_logits=True, exit_stats=exit_stats)
            real = None if mask is None else mask[:, -fed.shape[1]:]
            counts = _step_iterations(model, exit_stats, counts, fed, num_loops, use_cache, real)
            nxt = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                finished |= nxt == eos_token_id
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            step_input = nxt[:, None]
            if step == 0 and stats is not None:
                _sync(device)
                stats.prefill_seconds = time.perf_counter() - started
                started = time.perf_counter()
            elif stats is not None:
                stats.decode_steps += 1
            if eos_token_id is not None and bool(finished.all()):
                break
        if stats is not None:
            _sync(device)
            if stats.decode_steps:
                stats.decode_seconds = time.perf_counter() - started
            stats.kv_cache_bytes = cache.nbytes() if cache is not None else 0
    finally:
        model.train(was_training)
    iterations = torch.cat(counts, dim=1) if counts else ids.new_zeros(ids.shape[0], 0)
    if shift is not None:  # back to right padding: roll each row left by its pad count
        cols = (torch.arange(ids.shape[1], device=device)[None] + shift[:, None]) % ids.shape[1]
        ids = ids.gather(1, cols)
        if counts:
            iterations = torch.cat([iterations, iterations.new_zeros(ids.shape[0], 1)], dim=1).gather(1, cols)[:, :-1]
    if return_iterations:
        return ids, iterations
    return ids


def _step_iterations(model, stats: ExitStats, counts, fed: torch.Tensor, num_loops, use_cache: bool,
                     real: Optional[torch.Tensor] = None):
    """Iterations of the positions just run (a fixed-depth forward: its loop count for every real one)."""
    its = stats.iterations
    if its is None:
        its = torch.full(fed.shape, num_loops or model.cfg.num_loops, dtype=torch.long, device=fed.device)
        if real is not None:
            its = its * real
    return counts + [its] if use_cache else [its]


_SHADES = "▁▂▃▄▅▆▇█"


def iteration_strip(counts: Sequence[int], cap: int) -> str:
    """A compact heat-strip of loop iterations per token: one shaded block per token (▁ = 1 iteration,
    █ = the cap), e.g. '▂▂█▅▁'."""
    cap = max(1, int(cap))
    return "".join(_SHADES[min(len(_SHADES) - 1, (max(1, int(c)) - 1) * len(_SHADES) // cap)] for c in counts)

