"""`training.compile`: torch.compile of each transformer block, with the compile time logged.

Each `Block` is compiled in place (`nn.Module.compile`), so parameter names, checkpoints and DeepSpeed's
hooks on the model stay as they are, and the loop's N applications of a shared block reuse one compiled
graph (tests/training/test_compile.py checks that a second use compiles nothing new). Compilation is
lazy: it happens during the first training step, and `CompileTimer` reports each graph's compile time
through the run's log as it finishes.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch.nn as nn

from ..model.block import Block


class CompileTimer:
    """Logs the wall time of every Dynamo compilation (forward graphs, and backward graphs compiled
    lazily at the first backward) and keeps the total."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.total_s = 0.0
        self.graphs = 0
        self._start: Optional[float] = None
        try:
            from torch._dynamo.callback import callback_handler
        except ImportError:  # older torch: compile still works, only the timing is not reported
            self._handler = None
            return
        self._handler = callback_handler
        callback_handler.register_start_callback(self._on_start)
        callback_handler.register_end_callback(self._on_end)

    def _on_start(self, args) -> None:
        self._start = time.perf_counter()

    def _on_end(self, args) -> None:
        if self._start is None:
            return
        took = time.perf_counter() - self._start
        self._start = None
        self.total_s += took
        self.graphs += 1
        trigger = getattr(getattr(args, "callback_trigger", None), "name", "?").lower()
        self.log(f"torch.compile: graph {getattr(args, 'compile_id', '?')} ({trigger}) compiled in {took:.1f} s "
                 f"(total {self.total_s:.1f} s over {self.graphs} graph(s))")

    def close(self) -> None:
        if self._handler is not None:
            self._handler.remove_start_callback(self._on_start)
            self._handler.remove_end_callback(self._on_end)
            self._handler = None


def compile_blocks(model: nn.Module) -> int:
    """torch.compile every Block of `model` in place; returns how many were compiled."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)
