"""The loop stack: K shared blocks iterated r times, with gates, input injection and a chosen initial state.

Notation: e = the prelude's output (the embeddings when there is no prelude), s_t = the state entering
iteration t (t = 0..r-1), f = the shared core (each of the K blocks applied M times in place, blocks
keeping their own residuals), a_t = the gate of iteration t (a_t = 1 with gates 'none'; iterations
beyond the gate count reuse the last gate). One iteration, per `model.loop_injection`:

    none:      u_t = s_t                    s_{t+1} = s_t + a_t * (f(u_t) - s_t)      (Loop-Residual, today)
    add:       u_t = s_t + e                s_{t+1} = s_t + a_t * (f(u_t) - s_t)
    linear:    u_t = W [s_t ; e]            s_{t+1} = s_t + a_t * (f(u_t) - s_t)      (Huginn; W = [I I] at init)
    diagonal:  u_t = s_t                    s_{t+1} = A * s_t + B * e + a_t * (f(u_t) - u_t)
               A = exp(-softplus(delta) * softplus(rate)) in (0, 1) per channel, B = input_gain (Parcae-like)

With gates 'none' the first three read s_{t+1} = f(u_t); `none` with gates is bit-identical to the
original Loop-Residual update. Diagonal's init: softplus(delta) = 1 and softplus(rate) = ln 2, so A = 1/2,
and B = 1 - A = 1/2, which makes e the fixed point of the linear part (the state keeps the input's scale).

Initial state (`model.loop_state_init`): s_0 = e ('input'), 0 ('zeros') or N(0, sigma^2) per element
('random': drawn in training mode from the default RNG, which is identical on every TP rank; in eval mode
s_0 = 0, its mean, unless a `state_generator` is passed).

The depth of a call (iterations r, truncated backprop k, per-row depths, the no-grad prefix, the first
state's generator) arrives as one `LoopDepth` (model/depth.py, which also holds the truncation plan).
Per-position exits at inference (`adaptive`, criteria none|kl|entropy|gate) and the KV rule they follow
live in model/exit.py.

This module is the one place that knows about iterations, gates, inner loops, injection and activation
checkpointing.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..parallel import randn_like
from .block import Block
from .depth import LoopDepth, truncation_plan
from .exit import ExitRule, ExitStats, adaptive_loop
from .kv_cache import KVCache


class LinearInjection(nn.Module):
    """u = W [s ; e] with W: 2d -> d, no bias, initialised to [I I] (so u = s + e at the start, Huginn's
    adapter). Replicated on every TP rank: it acts on the replicated residual stream, whose gradient is
    already identical on all TP ranks (as for LayerNorm weights), so W's gradient needs no reduction (with
    sequence parallelism each rank sees its own positions only, and the TP group sums it, as for LayerNorms)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        eye = torch.eye(hidden_size)
        self.weight = nn.Parameter(torch.cat([eye, eye], dim=1))  # deterministic: consumes no RNG

    def forward(self, s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.cat([s, e], dim=-1), self.weight)


class DiagonalInjection(nn.Module):
    """The stable linear part A * s + B * e of the 'diagonal' update (replicated, per channel)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        # softplus(delta) = 1, softplus(rate) = ln 2  ->  A = exp(-ln 2) = 1/2; B = 1 - A.
        self.delta = nn.Parameter(torch.full((1,), math.log(math.e - 1.0)))
        self.rate = nn.Parameter(torch.zeros(hidden_size))
        self.input_gain = nn.Parameter(torch.full((hidden_size,), 0.5))

    def decay(self) -> torch.Tensor:
        """A in (0, 1): a negative continuous-time rate, discretised with a positive step."""
        return torch.exp(-F.softplus(self.delta) * F.softplus(self.rate))

    def forward(self, s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.decay() * s + self.input_gain * e


class LoopStack(nn.Module):
    """K shared blocks, r outer iterations, M inner repeats per block, gates, injection, initial state.
    With `sequence_parallel` (training mode) the states are sequence shards: the per-iteration checkpoints
    store 1/TP of the state, and the gates and injection act on this rank's positions."""

    sequence_parallel = False

    def __init__(self, cfg: ModelConfig, output_std: float):
        super().__init__()
        self.num_loops = cfg.num_loops
        self.inner_loops = cfg.inner_loops
        self.checkpointing = cfg.activation_checkpointing
        self.injection_kind = cfg.loop_injection
        self.state_init = cfg.loop_state_init
        self.state_std = cfg.loop_state_std
        self.blocks = nn.ModuleList([Block(cfg, output_std) for _ in range(cfg.num_layers)])
        gate_count = cfg.loop_gate_count or cfg.num_loops
        if cfg.loop_gates == "vector":
            self.gates = nn.Parameter(torch.full((gate_count, cfg.hidden_size), cfg.gate_init))
        elif cfg.loop_gates == "scalar":
            self.gates = nn.Parameter(torch.full((gate_count, 1), cfg.gate_init))
        else:
            self.register_parameter("gates", None)
        if cfg.loop_injection == "linear":
            self.injection = LinearInjection(cfg.hidden_size)
        elif cfg.loop_injection == "diagonal":
            self.injection = DiagonalInjection(cfg.hidden_size)
        else:
            self.injection = None

    def gate(self, n: int) -> Optional[torch.Tensor]:
        """Gate of iteration n (0-based). Iterations beyond the gate count (evaluating with more
        loops than trained) reuse the last gate."""
        if self.gates is None:
            return None
        return self.gates[min(n, self.gates.shape[0] - 1)]

    def _apply_block(self, block: Block, h: torch.Tensor, kv_cache: Optional[KVCache],
                     attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.checkpointing == "per-block" and self._checkpoint_active(kv_cache):
            if attn_mask is None:
                return checkpoint(block, h, use_reentrant=False)
            return checkpoint(block, h, None, attn_mask, use_reentrant=False)
        return block(h, kv_cache, attn_mask)

    def core(self, u: torch.Tensor, kv_cache: Optional[KVCache] = None,
             attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """f(u): every shared block applied inner_loops times in place."""
        for block in self.blocks:
            for _ in range(self.inner_loops):
                u = self._apply_block(block, u, kv_cache, attn_mask)
        return u

    def iteration(self, x: torch.Tensor, n: int, kv_cache: Optional[KVCache] = None,
                  e: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One outer iteration s_t -> s_{t+1} (the equations in the module docstring)."""
        kind = self.injection_kind
        if kind == "add":
            u = x + e
        elif kind == "linear":
            u = self.injection(x, e)
        else:
            u = x
        h = self.core(u, kv_cache, attn_mask)
        a = self.gate(n)
        if kind == "diagonal":
            update = h - u
            return self.injection(x, e) + (update if a is None else a * update)
        return h if a is None else x + a * (h - x)

    def _checkpoint_active(self, kv_cache: Optional[KVCache]) -> bool:
        return self.training and kv_cache is None and torch.is_grad_enabled()

    def initial_state(self, e: torch.Tensor, state_generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """s_0 from the prelude output e, per `loop_state_init`."""
        if self.state_init == "input":
            return e
        if self.state_init == "random" and (state_generator is not None or self.training):
            # The default RNG (None) draws the same on every TP rank; on sequence shards the whole sequence is drawn.
            noise = randn_like(e, self.sequence_parallel and self.training, state_generator)
            return noise.to(e.device) * self.state_std
        return torch.zeros_like(e)

    def advance(self, s: torch.Tensor, n: int, kv_cache=None, e: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, running: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Iteration n of a batch some of whose positions may be done: s_{n+1} where `running` (a mask that
        broadcasts against s: [B, 1, 1] for rows past their sampled depth, [B, T, 1] for positions that
        exited; None = all run), the state s unchanged elsewhere. The one step both loops take (`forward`
        below, model/exit.py `adaptive_loop`), with activation checkpointing when training."""
        if self.checkpointing == "per-iteration" and self._checkpoint_active(kv_cache):
            # Non-reentrant: the shared weights get one gradient per iteration, which the reentrant
            # variant (and deepspeed.checkpointing) mishandle under ZeRO-2/3.
            s_next = checkpoint(self.iteration, s, n, kv_cache, e, attn_mask, use_reentrant=False)
        else:
            s_next = self.iteration(s, n, kv_cache, e, attn_mask)
        return s_next if running is None else torch.where(running, s_next, s)

    def forward(self, x: torch.Tensor, depth: LoopDepth, kv_cache: Optional[KVCache] = None,
                attn_mask: Optional[torch.Tensor] = None, states: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """Run the loop on the prelude output `x` (= e) to the `depth` of this call and return the final state
        s_r. `states`, when given, receives s_1..s_r (the exit gate's training loss reads every iteration's
        state). `attn_mask`: a padded batch's attention mask (model/attention.py), passed to every block.

        Why this and model/exit.py `adaptive_loop` are two loops around one step (`advance`, which both call):
        this one is what training runs, and it must stay a plain `for` over `advance`: per-iteration grad
        tracking (truncated backprop), activation checkpointing (active only without a KV object, so it cannot
        see adaptive_loop's IterationKV view, which also keeps an iteration's keys/values alive for the KV
        rule) and no host synchronisation. adaptive_loop is inference only: the KV rule's view, the readouts,
        the criteria, compaction of stopped rows (the batch changes between iterations, one host sync each)
        and the early break. Running training through adaptive_loop with criterion 'none' would switch
        checkpointing off and hold the view's tensors; running exits through this loop would put the host
        syncs and compaction into the training step. Fixed depth with a KV cache already runs adaptive_loop
        (criterion 'none'); tests/model/test_exit.py checks that adaptive_loop with a criterion that never
        fires equals this loop bit for bit, and tests/inference that cached (adaptive) = recomputed."""
        e = x if self.injection_kind != "none" else None
        r, loop_depths, shallowest = depth.resolve(self.num_loops, x.shape[0], x.device)
        grad = torch.is_grad_enabled()
        plan = truncation_plan(r, depth.backprop_loops, grad, loop_depths, shallowest, depth.no_grad_loops)
        s = self.initial_state(x, depth.state_generator)
        for n in range(r):
            # Truncated backprop: iterations before plan.first_graph run under no_grad, so the state leaving
            # them carries no graph and nothing before first_graph gets gradient.
            tracked = grad and plan.tracked(n)
            if tracked and plan.cuts_rows(n):
                # Rows whose own last k iterations start here are cut from their earlier graph.
                s = torch.where((plan.row_starts == n).view(-1, 1, 1), s.detach(), s)
            with torch.set_grad_enabled(tracked):  # rows past their depth keep their state
                s = self.advance(s, n, kv_cache, e, attn_mask,
                                 None if loop_depths is None else (loop_depths > n).view(-1, 1, 1))
            if states is not None:
                states.append(s)
        return s

    def adaptive(self, x: torch.Tensor, depth: LoopDepth, kv_cache, rule: ExitRule, coda=None, head=None,
                 gate=None, stats: Optional[ExitStats] = None, attn_mask: Optional[torch.Tensor] = None,
                 real: Optional[torch.Tensor] = None, offset: int = 0) -> torch.Tensor:
        """Inference with per-position exits, `depth.num_loops` being the cap (model/exit.py: the criteria, the
        KV rule and the compaction of stopped rows); `real` [B, T] marks the positions that are not padding
        (None: all are), `offset` the positions already cached."""
        if not depth.is_fixed:
            raise ValueError("exit criteria cannot be combined with loop_depths or backprop_loops.")
        return adaptive_loop(self, x, depth.num_loops or self.num_loops, kv_cache, rule, coda, head, gate, stats,
                             depth.state_generator, attn_mask, real, offset)
