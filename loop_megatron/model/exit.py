"""Adaptive per-token exit at inference, the learned exit gate, and the one KV rule both paths follow.

Exit criteria (inference only: eval mode or no grad). After outer iteration n (1-based) of the loop, each
position that is still iterating tests its criterion; a position whose test holds stops: its state is
frozen (s stays s_n) for the remaining iterations the other positions run, and n is its iteration count.
The last allowed iteration (`num_loops`, the cap) always stops.

    none      never exits early: the fixed-depth model, bit for bit.
    entropy   H(p_n) < T (nats), p_n the next-token distribution after iteration n.
    kl        KL(p_n || p_{n-1}) < T (nats), from iteration 2 on (Huginn's criterion).
    gate      the learned exit gate's cumulative exit probability 1 - prod_{j<=n} (1 - lambda_j) >= T
              (Ouro's rule), lambda_j = sigmoid(w . LayerNorm(s_j) + b).

How p_n is decoded (kl, entropy): like Huginn, the state is read out through the coda, ln_f and the LM head
after every iteration, p_n = softmax(head(ln_f(coda(s_n)))). The coda's applications at iteration n are part
of iteration n (one KV-cache slot each, after the core's) and follow the KV rule below, and a position's
output logits are those of the iteration it exited at: the distribution the criterion judged. The gate reads
the state alone, so with `gate` (and `none`) the coda runs once after the loop on the final states.
Under tensor parallelism the logits are vocabulary-parallel: softmax statistics are TP all-reduces, and the
stop decisions are all-reduced (MAX) so every TP rank takes exactly the same ones.

THE KV RULE ("latest entry"; the full-sequence forward and cached generation both implement it):
    At iteration n, block application j of a position that stopped after iteration m < n contributes the
    key/value it produced at iteration m, application j (its latest entry); it is not recomputed from the
    frozen state. A position still iterating contributes its freshly computed key/value.
The full-sequence forward merges per application: k = where(active, k_new, k_latest). The KV cache keeps one
slot per block application (model/kv_cache.py); a token that stopped after m iterations has its slots of
iterations m+1..num_loops filled with its iteration-m entries (copies), so a later token's iteration n reads
exactly what the full-sequence forward would. Exited positions' queries are never used (their outputs are
discarded), so a generation step whose tokens all stopped skips the remaining iterations entirely.

Padding (a batch with an attention mask, model/gpt.py): pad positions are treated as already exited. They
start inactive, run no iteration (their state stays s_0, their iteration count is 0, so ExitStats means taken
over positions with iterations > 0 ignore them), never hold back the "everyone stopped" shortcut, and their
keys/values are masked out of every real position's attention, so they cannot change a real position's output
or exit decision.

Learned exit gate (`model.exit_gate`, Ouro): training loss = sum_n p(exit at n) L_n - beta * H(p(exit)),
per token, with p(exit at n) = lambda_n prod_{j<n} (1 - lambda_j) and the last iteration (the row's depth)
taking the remainder; L_n is the LM loss of the readout after iteration n.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ..parallel import get_tensor_model_parallel_group, get_tensor_model_parallel_world_size
from .kv_cache import KVCache

EXIT_CRITERIA = ("none", "kl", "entropy", "gate")
DECODING_CRITERIA = ("kl", "entropy")  # read the state out through coda + head every iteration


@dataclass
class ExitStats:
    """Out-parameter of an adaptive forward: `iterations` [batch, seq] (long) = outer iterations each new
    position used (the cap for positions that never met the criterion; 0 for padding positions)."""

    iterations: Optional[torch.Tensor] = None


class ExitGate(nn.Module):
    """lambda = sigmoid(w . LayerNorm(s) + b): the probability of stopping after this iteration (replicated on
    every TP rank: it reads the replicated state, so its gradient is the same on all of them)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)  # lambda = 1/2 everywhere at the start; consumes no RNG
        nn.init.zeros_(self.proj.bias)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(self.norm(s)).squeeze(-1).float())


# ----------------------------------------------------------------------------------------------------
# Distribution statistics over vocabulary-parallel logits
# ----------------------------------------------------------------------------------------------------
def _tp_all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    if get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=get_tensor_model_parallel_group())
    return x


def log_softmax_parallel(logits_parallel: torch.Tensor) -> torch.Tensor:
    """This rank's slice of log softmax over the whole (TP-sharded) vocabulary, in fp32."""
    z = logits_parallel.float()
    zmax = _tp_all_reduce(z.max(dim=-1, keepdim=True).values.contiguous(), dist.ReduceOp.MAX)
    sum_exp = _tp_all_reduce((z - zmax).exp().sum(dim=-1, keepdim=True))
    return z - zmax - sum_exp.log()


def entropy_parallel(log_p: torch.Tensor) -> torch.Tensor:
    """H(p) in nats from sharded log-probabilities (padding rows at -inf contribute 0)."""
    return _tp_all_reduce(-torch.special.xlogy(log_p.exp(), log_p.exp()).sum(dim=-1))


def kl_parallel(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in nats from sharded log-probabilities."""
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return _tp_all_reduce(terms.sum(dim=-1))


def _agree(stop: torch.Tensor) -> torch.Tensor:
    """Every TP rank takes the same decision (stop if any rank says stop; they differ only by rounding)."""
    if get_tensor_model_parallel_world_size() == 1:
        return stop
    flags = stop.to(torch.int32)
    _tp_all_reduce(flags, dist.ReduceOp.MAX)
    return flags.bool()


# ----------------------------------------------------------------------------------------------------
# The learned gate's training objective
# ----------------------------------------------------------------------------------------------------
def exit_distribution(lambdas: torch.Tensor, depths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """p(exit at n) = lambda_n prod_{j<n} (1 - lambda_j), n = 0..R-1 along dim 0 of `lambdas` [R, B, T];
    the last iteration (R - 1, or row b's depths[b] - 1) takes the remainder, later ones get 0."""
    R = lambdas.shape[0]
    last = torch.arange(R, device=lambdas.device).view(R, 1, 1)
    if depths is None:
        final = last == R - 1
    else:
        final = last == (depths.to(lambdas.device).view(1, -1, 1) - 1)
    lam = torch.where(final, torch.ones_like(lambdas), lambdas)
    survive = torch.cumprod(torch.cat([torch.ones_like(lam[:1]), 1 - lam[:-1]]), dim=0)  # prod_{j<n}(1-lambda_j)
    return lam * survive


def expected_exit_loss(per_iteration_loss: torch.Tensor, lambdas: torch.Tensor, keep: torch.Tensor,
                       beta: float, depths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over kept tokens of sum_n p_n L_n - beta * H(p): per_iteration_loss and lambdas are [R, B, T],
    keep [B, T] (labels that are not ignored)."""
    p = exit_distribution(lambdas, depths)
    expected = (p * per_iteration_loss.float()).sum(dim=0)
    # p log p with a finite gradient at p = 0: iterations past a row's depth have p = 0 exactly, where xlogy's
    # gradient (log p + 1) is -inf and times dp/dlambda = 0 gives NaN. The clamp changes no value (0 * x = 0).
    entropy = -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(dim=0)
    per_token = expected - beta * entropy
    keep = keep.to(per_token.dtype)
    return (per_token * keep).sum() / keep.sum().clamp(min=1)


def configure_exit_training(model: nn.Module, entropy_beta: float, gate_only: bool) -> None:
    """Give the model its entropy bonus and, for the gate-only stage, freeze every parameter but the exit
    gate's. Call before the optimizer (or deepspeed.initialize) is built: it keeps only trainable ones."""
    model.exit_entropy_beta = float(entropy_beta)
    if gate_only:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("exit_gate."))


# ----------------------------------------------------------------------------------------------------
# The latest-entry KV view and the adaptive loop
# ----------------------------------------------------------------------------------------------------
class LatestEntryKV:
    """What attention sees inside the adaptive loop: the KV rule above, in front of an optional KVCache.

    `update(k, v)` gets the new positions' keys/values [B, heads, T, head_dim] of the next block application
    of the current iteration, replaces those of positions no longer active by their latest entry for that
    application, remembers the result as the new latest entry and passes it on to the cache (if any)."""

    def __init__(self, cache: Optional[KVCache]):
        self.cache = cache
        self.latest: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self.active: Optional[torch.Tensor] = None
        self.index = 0

    def start_iteration(self, active: torch.Tensor) -> None:
        self.active = active[:, None, :, None]
        self.index = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        j = self.index
        self.index += 1
        if j < len(self.latest):
            old_k, old_v = self.latest[j]
            k, v = torch.where(self.active, k, old_k), torch.where(self.active, v, old_v)
            self.latest[j] = (k, v)
        else:
            self.latest.append((k, v))
        return self.cache.update(k, v) if self.cache is not None else (k, v)

    def fill_iteration(self) -> None:
        """An iteration nobody runs: append every position's latest entries to the cache's slots."""
        if self.cache is not None:
            for k, v in self.latest:
                self.cache.update(k, v)


@dataclass
class ExitRule:
    """The inference-time exit settings of one forward: a criterion of EXIT_CRITERIA and its threshold (None =
    the model config's exit_threshold)."""

    criterion: str
    threshold: Optional[float] = None

    def __post_init__(self):
        if self.criterion not in EXIT_CRITERIA:
            raise ValueError(f"exit criterion must be one of {EXIT_CRITERIA}, got {self.criterion!r}.")

    @property
    def decodes(self) -> bool:
        return self.criterion in DECODING_CRITERIA


def adaptive_loop(stack, x: torch.Tensor, num_loops: int, kv_cache: Optional[KVCache], rule: ExitRule,
                  readout: Optional[Callable], gate: Optional[nn.Module], stats: Optional[ExitStats],
                  state_generator: Optional[torch.Generator] = None, attn_mask: Optional[torch.Tensor] = None,
                  real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run `stack` (a LoopStack) with per-position exits. Returns the final (frozen) states [B, T, d], or,
    for the decoding criteria, the output logits (this rank's vocabulary slice) of each position's exit
    iteration. `readout(s, kv)` = coda + ln_f + head through the KV view (decoding criteria only).
    `attn_mask` (a padded batch's attention mask) goes to every block application; `real` [B, T] (bool) marks
    the non-padding positions: the others count as exited before the first iteration."""
    e = x if stack.injection_kind != "none" else None
    s = stack.initial_state(x, state_generator)
    B, T = s.shape[:2]
    if real is None:
        active = torch.ones(B, T, dtype=torch.bool, device=s.device)
    else:
        active = real.to(device=s.device, dtype=torch.bool).clone()
    iterations = torch.zeros(B, T, dtype=torch.long, device=s.device)
    view = LatestEntryKV(kv_cache)
    out = prev_log_p = None
    survive = torch.ones(B, T, dtype=torch.float32, device=s.device)  # gate: prod (1 - lambda_j)
    for n in range(num_loops):
        view.start_iteration(active)
        s = torch.where(active[..., None], stack.iteration(s, n, view, e, attn_mask), s)
        iterations += active
        last = n == num_loops - 1
        if rule.decodes:
            logits = readout(s, view)
            out = logits if out is None else torch.where(active[..., None], logits, out)
            log_p = log_softmax_parallel(logits)
            if rule.criterion == "entropy":
                stop = entropy_parallel(log_p) < rule.threshold
            else:
                stop = (kl_parallel(log_p, prev_log_p) < rule.threshold if prev_log_p is not None
                        else torch.zeros_like(active))
            prev_log_p = log_p
        elif rule.criterion == "gate":
            survive = survive * (1 - gate(s))
            stop = (1 - survive) >= rule.threshold
        else:
            stop = torch.zeros_like(active)
        if last:
            break
        active = active & ~_agree(stop)
        if not bool(active.any()):  # everyone stopped: the remaining iterations only fill cache slots
            for _ in range(n + 1, num_loops):
                view.fill_iteration()
            break
    if stats is not None:
        stats.iterations = iterations
    return out if rule.decodes else s
