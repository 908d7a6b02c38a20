"""Key/value cache for incremental decoding of a looped model.

A looped model applies the same block several times per token, and every application sees a different
hidden state, so every *application* (prelude block, each loop iteration x block x inner repeat, coda
block) needs its own cache slot, even though the weights are shared. The model calls `begin()` at the
start of each forward; each attention call then takes the next slot in application order, which is the
same order on every forward.
"""
from __future__ import annotations

from typing import List, Tuple

import torch


class KVCache:
    """Per-application key/value tensors ([batch, heads, seq, head_dim]) for one generation."""

    def __init__(self):
        self.slots: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self.cursor = 0
        self.seq_len = 0  # tokens already cached (the position offset of the next forward)

    def begin(self) -> None:
        self.cursor = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values to the current slot and return the slot's full tensors."""
        i = self.cursor
        self.cursor += 1
        if i < len(self.slots):
            past_k, past_v = self.slots[i]
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            self.slots[i] = (k, v)
        else:
            self.slots.append((k, v))
        return k, v

    def end(self, new_tokens: int) -> None:
        self.seq_len += new_tokens
