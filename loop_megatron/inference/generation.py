"""Autoregressive sampling from a LoopGPT with a per-application KV cache.

The prompt is run once (prefill) into a `KVCache`, then one token per step; the cache keeps one slot per
block application, so it is correct across loop iterations and inner loops. `temperature=0` is greedy
(argmax); otherwise logits are divided by the temperature, optionally filtered by top-k and top-p
(nucleus), and sampled with a seeded generator.

Adaptive depth: `exit_criterion` (none|kl|entropy|gate) and `exit_threshold` stop each token's loop
separately (num_loops is then the cap); the cache follows the same "latest entry" KV rule as the
full-sequence forward (model/exit.py), so cached and recomputed generation agree.
`return_iterations=True` also returns the iterations each fed position used.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..model import KVCache
from ..model.exit import ExitStats


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


@torch.no_grad()
def generate(model, prompt: Union[torch.Tensor, Sequence[int]], max_new_tokens: int = 50, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, num_loops: Optional[int] = None,
             eos_token_id: Optional[int] = None, seed: Optional[int] = None, use_cache: bool = True,
             exit_criterion: Optional[str] = None, exit_threshold: Optional[float] = None,
             return_iterations: bool = False):
    """Prompt plus continuation, LongTensor [B, T + new] (a 1-D prompt is treated as batch 1).
    With `return_iterations`, (ids, iterations): iterations [B, T + new - 1] holds the loop iterations each
    position that was run through the model used (the last token is sampled, never run).

    Stops after `max_new_tokens`, when every row has produced `eos_token_id`, or at the model's
    position limit (max_position_embeddings). Rows that finished early are padded with eos.
    `use_cache=False` recomputes the whole sequence each step (slow; a reference for the cache).
    """
    device = next(model.parameters()).device
    ids = torch.as_tensor(prompt, dtype=torch.long, device=device)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty; give at least one token.")
    limit = model.cfg.max_position_embeddings
    if ids.shape[1] > limit:
        raise ValueError(f"the prompt has {ids.shape[1]} tokens, more than max_position_embeddings ({limit}).")
    max_new_tokens = max(0, min(max_new_tokens, limit - ids.shape[1]))
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        cache = KVCache() if use_cache else None
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        step_input = ids
        counts = []
        for _ in range(max_new_tokens):
            stats = ExitStats()
            logits, _ = model(step_input if use_cache else ids, num_loops=num_loops, kv_cache=cache,
                              return_logits=True, exit_criterion=exit_criterion, exit_threshold=exit_threshold,
                              exit_stats=stats)
            counts = _step_iterations(model, stats, counts, step_input if use_cache else ids, num_loops, use_cache)
            nxt = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                finished |= nxt == eos_token_id
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
            if eos_token_id is not None and bool(finished.all()):
                break
    finally:
        model.train(was_training)
    if return_iterations:
        return ids, (torch.cat(counts, dim=1) if counts else ids.new_zeros(ids.shape[0], 0))
    return ids


def _step_iterations(model, stats: ExitStats, counts, fed: torch.Tensor, num_loops, use_cache: bool):
    """Iterations of the positions just run (a fixed-depth forward: its loop count for every one)."""
    its = stats.iterations
    if its is None:
        its = torch.full(fed.shape, num_loops or model.cfg.num_loops, dtype=torch.long, device=fed.device)
    return counts + [its] if use_cache else [its]


_SHADES = "▁▂▃▄▅▆▇█"


def iteration_strip(counts: Sequence[int], cap: int) -> str:
    """A compact heat-strip of loop iterations per token: one shaded block per token (▁ = 1 iteration,
    █ = the cap), e.g. '▂▂█▅▁'."""
    cap = max(1, int(cap))
    return "".join(_SHADES[min(len(_SHADES) - 1, (max(1, int(c)) - 1) * len(_SHADES) // cap)] for c in counts)

