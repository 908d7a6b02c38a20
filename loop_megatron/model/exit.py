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
    delta     ||s_n - s_{n-1}|| / ||s_n|| < T: the relative change of the latent state (Huginn reports it); it
              reads no vocabulary, so it costs a norm per position.

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

Cost (what makes an exit as fast as the depth it uses): rows whose positions all stopped are compacted out of
the batch (the core runs on the gathered running rows; states and fresh keys/values are scattered back, the
stopped rows' slots get their latest entries), and the head reads out only the positions deciding now.

KV sharing across iterations (ExitRule.kv_share, the cache's slots named by IterationKV.key):
    all       one slot per (iteration, application): the rule above.
    first     every iteration attends to the iteration-1 entries (Mixture-of-Recursions' recursion-wise
              sharing); the full-sequence forward and the cache both implement it, so they agree exactly.
    last (k)  iteration n uses slot n mod k (Huginn's KV budget): past tokens contribute their last write among
              iterations = n (mod k) (latest-entry copies included), the current forward's tokens their
              iteration-n entries. Defined by the cache; without one it is 'all'.

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

EXIT_CRITERIA = ("none", "kl", "entropy", "gate", "delta")
DECODING_CRITERIA = ("kl", "entropy")  # read the state out through coda + head every iteration
KV_SHARING = ("all", "first", "last")


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
# The iteration KV view and the adaptive loop
# ----------------------------------------------------------------------------------------------------
@dataclass
class ExitRule:
    """The inference-time loop settings of one forward (see the module docstring for each).

    criterion/threshold: the exit test (EXIT_CRITERIA; threshold None = the model config's exit_threshold).
    fixed_prefix: the sequence's first `fixed_prefix` columns (cached ones included) never test the criterion
    and run to the cap: `generate(prefill="full")` sets it to the prompt width (prefill at full depth).
    kv_share / kv_budget: which iterations' keys/values a block application attends to (KV_SHARING)."""

    criterion: str
    threshold: Optional[float] = None
    fixed_prefix: int = 0
    kv_share: str = "all"
    kv_budget: int = 1

    def __post_init__(self):
        if self.criterion not in EXIT_CRITERIA:
            raise ValueError(f"exit criterion must be one of {EXIT_CRITERIA}, got {self.criterion!r}.")
        if self.kv_share not in KV_SHARING:
            raise ValueError(f"kv_share must be one of {KV_SHARING}, got {self.kv_share!r}.")
        if self.kv_budget < 1:
            raise ValueError(f"kv_budget must be >= 1, got {self.kv_budget}.")

    @property
    def decodes(self) -> bool:
        return self.criterion in DECODING_CRITERIA


class IterationKV:
    """What attention sees inside the adaptive loop: the KV rule and the rule's kv_share, in front of an
    optional KVCache (or the Hugging Face adapter's cache: anything with `write(key, k, v)` and `read(key)`).

    Attention calls `update(k, v)` with the fresh keys/values [rows, heads, T, head_dim] of the rows the core
    computes this iteration (all rows, or the compacted subset `rows`); the view merges them with the latest
    entries of positions no longer active, keeps the full-batch result as the new latest entry, stores it in
    the cache slot of (iteration, application) and returns what the computed rows attend to."""

    def __init__(self, cache, rule: ExitRule):
        self.cache = cache
        self.share, self.budget = rule.kv_share, rule.kv_budget
        self.latest: List[Tuple[torch.Tensor, torch.Tensor]] = []  # per application of an iteration, full batch
        self.n = self.j = 0
        self.active: Optional[torch.Tensor] = None
        self.rows: Optional[torch.Tensor] = None

    def key(self, n: int, j: int):
        return ("loop", n % self.budget if self.share == "last" else n, j)

    def start_iteration(self, n: int, active: Optional[torch.Tensor], rows: Optional[torch.Tensor]) -> None:
        """Iteration n over the rows `rows` (None: all), `active` [len(rows), T] their positions still iterating
        (None: every one of them, so nothing is merged)."""
        self.n, self.j = n, 0
        self.active, self.rows = (None if active is None else active[:, None, :, None]), rows

    def _rows(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.rows is None:
            return k, v
        return k.index_select(0, self.rows), v.index_select(0, self.rows)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        j = self.j
        self.j += 1
        if self.share == "first" and self.n > 0:  # every iteration attends to the first iteration's entries
            return self._rows(*(self.cache.read(self.key(0, j)) if self.cache is not None else self.latest[j]))
        if j < len(self.latest):
            old_k, old_v = self.latest[j]
            if self.active is None and self.rows is None:
                pass  # every position computed fresh entries
            elif self.active is None:
                k, v = old_k.index_copy(0, self.rows, k), old_v.index_copy(0, self.rows, v)
            elif self.rows is None:
                k, v = torch.where(self.active, k, old_k), torch.where(self.active, v, old_v)
            else:
                k = old_k.index_copy(0, self.rows, torch.where(self.active, k, old_k.index_select(0, self.rows)))
                v = old_v.index_copy(0, self.rows, torch.where(self.active, v, old_v.index_select(0, self.rows)))
            self.latest[j] = (k, v)
        else:
            assert self.rows is None, "the first iteration runs every row"
            self.latest.append((k, v))
        if self.cache is None:
            return self._rows(k, v)
        return self._rows(*self.cache.write(self.key(self.n, j), k, v))

    def fill(self, first: int, stop: int) -> None:
        """Iterations first..stop-1, which nobody runs: every position's latest entries go to their slots."""
        if self.cache is None or self.share == "first":
            return
        iterations = range(first, stop)
        if self.share == "last":  # each of the budget's slots is last written by one of the final `budget` ones
            iterations = iterations[-self.budget:]
        for n in iterations:
            for j, (k, v) in enumerate(self.latest):
                self.cache.write(self.key(n, j), k, v)


def _criterion(rule: ExitRule, n: int, s_old: torch.Tensor, s_new: torch.Tensor, log_p: Optional[torch.Tensor],
               prev_log_p: Optional[torch.Tensor], survive: Optional[torch.Tensor]) -> torch.Tensor:
    """stop [N] of the N positions deciding after iteration n (0-based) from their states (and readouts)."""
    if rule.criterion == "entropy":
        return entropy_parallel(log_p) < rule.threshold
    if rule.criterion == "kl":
        if n == 0:
            return torch.zeros(log_p.shape[0], dtype=torch.bool, device=log_p.device)
        return kl_parallel(log_p, prev_log_p) < rule.threshold
    if rule.criterion == "gate":
        return (1 - survive) >= rule.threshold
    # delta: the relative change of the latent state, ||s_n - s_{n-1}|| / ||s_n|| (no readout)
    change = (s_new.float() - s_old.float()).norm(dim=-1)
    return change < rule.threshold * s_new.float().norm(dim=-1)


def adaptive_loop(stack, x: torch.Tensor, num_loops: int, kv_cache, rule: ExitRule,
                  coda: Optional[Callable] = None, head: Optional[Callable] = None, gate: Optional[nn.Module] = None,
                  stats: Optional[ExitStats] = None, state_generator: Optional[torch.Generator] = None,
                  attn_mask: Optional[torch.Tensor] = None, real: Optional[torch.Tensor] = None,
                  offset: int = 0) -> torch.Tensor:
    """Run `stack` (a LoopStack) with per-position exits (inference). Returns the final (frozen) states
    [B, T, d], or, for the decoding criteria, the output logits (this rank's vocabulary slice) of each
    position's exit iteration. `coda(s, kv, attn_mask)` and `head(h)` (ln_f + LM head) are the readout of the
    decoding criteria. `attn_mask`: a padded batch's attention mask; `real` [B, T] (bool) marks the
    non-padding positions (the others count as exited before the first iteration); `offset`: the columns
    already cached (for `rule.fixed_prefix`).

    Cost: rows whose positions all stopped leave the batch (compaction: the core runs on the remaining rows,
    gathered; their results are scattered back), and the head reads out only positions that decide now."""
    e = x if stack.injection_kind != "none" else None
    s = stack.initial_state(x, state_generator)
    B, T = s.shape[:2]
    device = s.device
    active = torch.ones(B, T, dtype=torch.bool, device=device) if real is None else \
        real.to(device=device, dtype=torch.bool).clone()
    decides, decide_all = active, real is None
    if rule.fixed_prefix > offset:  # positions of the prefix run to the cap without testing the criterion
        decides = active & (torch.arange(offset, offset + T, device=device) >= rule.fixed_prefix)[None]
        decide_all = False
    iterations = torch.zeros(B, T, dtype=torch.long, device=device)
    view = IterationKV(kv_cache, rule)
    out = prev_log_p = None
    survive = torch.ones(B, T, dtype=torch.float32, device=device) if rule.criterion == "gate" else None
    rows = None  # the rows the core computes (None: all)
    everyone = real is None  # every computed position is still iterating (nothing to merge)

    def pick(t):  # a [B, ...] tensor's computed rows
        return t if t is None or rows is None else t.index_select(0, rows)

    for n in range(num_loops):
        last = n == num_loops - 1
        act = pick(active)
        s_rows = pick(s)
        view.start_iteration(n, None if everyone else act, rows)
        mask_rows = pick(attn_mask)
        s_new = stack.advance(s_rows, n, view, pick(e), mask_rows, None if everyone else act[..., None])
        iterations += active
        # The positions whose decision (or output logits) is needed after this iteration: `take` gathers theirs
        # from a computed-rows tensor, `get`/`put` read/write theirs in a full [B, T, ...] one. Dense case (every
        # computed position decides: decoding, or a prefill before anyone stopped): reshapes, no host sync.
        if everyone and (decide_all or (last and rule.decodes)):
            take = lambda t: t.flatten(0, 1)  # noqa: E731
            get = lambda full: take(pick(full))  # noqa: E731

            def put(full, vals):
                vals = vals.view(act.shape + vals.shape[1:])
                return vals if rows is None else full.index_copy(0, rows, vals)
        else:
            want = act if (last and rule.decodes) else act & pick(decides)
            want_full = want if rows is None else torch.zeros_like(active).index_copy(0, rows, want)
            take = lambda t: t[want]  # noqa: E731
            get = lambda full: full[want_full]  # noqa: E731
            put = lambda full, vals: full.index_put((want_full,), vals)  # noqa: E731
        stop = None
        if rule.decodes:
            h = coda(s_new, view, mask_rows)  # every position's coda entries of this iteration are attended to
            logits = head(take(h))
            log_p = log_softmax_parallel(logits)
            out = put(logits.new_zeros(B, T, logits.shape[-1]) if out is None else out, logits)
            if not last:
                stop = _criterion(rule, n, None, None, log_p, None if n == 0 else get(prev_log_p), None)
                prev_log_p = put(log_p.new_zeros(B, T, log_p.shape[-1]) if prev_log_p is None else prev_log_p, log_p)
        elif rule.criterion != "none" and not last:
            if survive is not None:
                survive = put(survive, get(survive) * (1 - gate(take(s_new))))
            stop = _criterion(rule, n, take(s_rows), take(s_new), None, None,
                              None if survive is None else get(survive))
        s = s_new if rows is None else s.index_copy(0, rows, s_new)
        if last:
            break
        if stop is None:  # nobody decided: the same rows run again
            continue
        active = active & ~_agree(put(torch.zeros_like(active), stop))
        running = active.any(dim=1).nonzero().squeeze(1)
        count = running.numel()  # one host sync per iteration
        if count == 0:  # everyone stopped: the remaining iterations only fill cache slots
            view.fill(n + 1, num_loops)
            break
        rows = None if count == B else running
        everyone = T == 1  # one position per row: the computed (running) rows are all still iterating
    if stats is not None:
        stats.iterations = iterations
    return out if rule.decodes else s
