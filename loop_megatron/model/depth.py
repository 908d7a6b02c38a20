"""How deep one forward pass runs the loop: the per-call depth settings as one object, and the truncation plan.

`LoopDepth` travels unchanged from whoever chooses the depth (the training sampler, evaluation, generation,
the Hugging Face adapter) to the loop stack, the one place that reads it. Its fields, all optional (an empty
`LoopDepth()` is the fixed-depth model at its own `model.num_loops`):

  num_loops r        iterations to run (default: the model's num_loops; with loop_depths: max(loop_depths)).
  backprop_loops k   truncated backprop: only each row's last k iterations get gradient. 0 = all.
  loop_depths [B]    per-row depths r_b: the batch runs max(r_b) iterations and row b's state is held
                     (s_{t+1} = s_t) after its own r_b, by masking the update, so each row equals that row
                     run alone at depth r_b.
  no_grad_loops      with k and loop_depths: run at most this many leading iterations under no_grad (the
                     default is max(min(loop_depths) - k, 0), which depends on this rank's rows). Under
                     ZeRO-3 every data-parallel rank must build its graph over the same iterations (the
                     backward gathers parameters collectively per module call), so the trainer passes the
                     value of the whole micro-step. Gradients do not change: each row is still cut where
                     its own last k iterations begin.
  state_generator    a torch.Generator for a 'random' initial state (also in eval mode).

`truncation_plan` turns (r, k, the rows' depths) into which iterations build an autograd graph: a pure
function, tested on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

import torch


@dataclass(frozen=True)
class LoopDepth:
    """The loop depth of one forward pass (see the module docstring for each field)."""

    num_loops: Optional[int] = None
    """r: outer iterations to run; None = the model's num_loops (or max(loop_depths) with loop_depths)."""

    backprop_loops: int = 0
    """k: gradient through each row's last k iterations only (truncated backprop); 0 = all."""

    loop_depths: Optional[torch.Tensor] = None
    """LongTensor [batch]: row b stops after loop_depths[b] iterations (its state is held after that)."""

    no_grad_loops: Optional[int] = None
    """With backprop_loops and loop_depths: at most this many leading iterations run without a graph."""

    state_generator: Optional[torch.Generator] = None
    """Generator of a 'random' model's first state (in eval mode the state is 0 without one)."""

    @classmethod
    def of(cls, depth: Union[None, int, "LoopDepth"]) -> "LoopDepth":
        """`depth` as a LoopDepth: None = the model's own depth, an int = that many iterations."""
        if depth is None:
            return cls()
        if isinstance(depth, cls):
            return depth
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise TypeError(f"depth must be None, an int or a LoopDepth, got {type(depth).__name__}.")
        return cls(num_loops=depth)

    def with_loops(self, num_loops: Optional[int]) -> "LoopDepth":
        """The same settings at another iteration count."""
        return replace(self, num_loops=num_loops)

    @property
    def is_fixed(self) -> bool:
        """True when the call asks for nothing but (at most) an iteration count and a generator."""
        return not self.backprop_loops and self.loop_depths is None

    def resolve(self, default_loops: int, batch: int, device: torch.device
                ) -> Tuple[int, Optional[torch.Tensor], Optional[int]]:
        """(r, loop_depths on `device` or None, min(loop_depths) or None) for a batch of `batch` rows, with
        one host sync when there are per-row depths. Raises ValueError on depths that cannot work."""
        rows = self.loop_depths
        if rows is None:
            return self.num_loops or default_loops, None, None
        rows = rows.to(device=device, dtype=torch.long).view(-1)
        if rows.shape[0] != batch:
            raise ValueError(f"loop_depths has {rows.shape[0]} entries for a batch of {batch}.")
        deepest, shallowest = torch.stack([rows.max(), rows.min()]).tolist()  # one host sync
        if shallowest < 1:
            raise ValueError("loop_depths must all be >= 1.")
        if self.num_loops is not None and self.num_loops < deepest:
            raise ValueError(f"num_loops ({self.num_loops}) is below the deepest row of loop_depths ({deepest}).")
        return self.num_loops or deepest, rows, shallowest


@dataclass(frozen=True)
class TruncationPlan:
    """Which iterations of a forward build an autograd graph.

    Iterations 0..first_graph-1 run under torch.no_grad(). With per-row depths, `row_starts[b]` is the
    iteration where row b's own last k iterations begin: entering a later iteration n > first_graph with
    n == row_starts[b], row b's state is detached, so nothing before it gets gradient from that row."""

    first_graph: int = 0
    row_starts: Optional[torch.Tensor] = None

    def tracked(self, n: int) -> bool:
        """Whether iteration n builds a graph (when gradients are enabled at all)."""
        return n >= self.first_graph

    def cuts_rows(self, n: int) -> bool:
        """Whether some rows may be cut from their earlier graph entering iteration n."""
        return self.row_starts is not None and n > self.first_graph


def truncation_plan(r: int, k: int, grad_enabled: bool, loop_depths: Optional[torch.Tensor] = None,
                    shallowest: Optional[int] = None, no_grad_loops: Optional[int] = None) -> TruncationPlan:
    """The graph plan of r iterations with gradient through each row's last k (k <= 0 or k >= r: all).

    Without per-row depths the first r - k run without a graph. With `loop_depths` (min `shallowest`),
    the leading max(shallowest - k, 0) iterations, at most `no_grad_loops` of them, run without a graph,
    and each row is cut where its own last k begin."""
    if not grad_enabled or k <= 0 or k >= r:
        return TruncationPlan()  # every iteration (if any) builds the graph
    if loop_depths is None:
        return TruncationPlan(r - k)
    first_graph = max(int(shallowest) - k, 0)
    if no_grad_loops is not None:
        first_graph = max(0, min(first_graph, int(no_grad_loops)))
    return TruncationPlan(first_graph, (loop_depths - k).clamp(min=0))


DepthLike = Union[None, int, LoopDepth]

__all__ = ["DepthLike", "LoopDepth", "TruncationPlan", "truncation_plan"]
