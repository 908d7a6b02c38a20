"""Key/value cache for incremental decoding of a looped model.

A looped model applies the same block several times per token, and every application sees a different
hidden state, so every *application* (prelude block, each loop iteration x block x inner repeat, coda
block) has its own cache slot, even though the weights are shared. Slots are named by keys:
  * `update(k, v)` takes the next slot in application order (keys 0, 1, ...; the model calls `begin()` at the
    start of each forward, so the prelude and the coda take the same slots every time);
  * `write(key, k, v)` stores into a named slot: the loop's iterations use keys the iteration view chooses
    (model/exit.py `IterationKV`), which is how iterations may share slots (`ExitRule.kv_share`).
A write stores this forward's positions (seq_len .. seq_len + T) and returns the slot's keys/values of every
position so far; writing the same slot again in one forward replaces this forward's entries (an iteration
reusing a slot overwrites, it does not append).

Storage is preallocated per slot (`capacity` positions, doubled when outgrown) and written in place, so a
decoding step copies one position per slot instead of concatenating the whole history every step.
"""
from __future__ import annotations

from typing import Dict, Hashable, List, Tuple

import torch


class KVCache:
    """Per-slot key/value tensors ([batch, heads, seq, head_dim]) for one generation."""

    def __init__(self, capacity: int = 0):
        self.capacity = int(capacity)  # positions to allocate per slot up front (0: grow as needed)
        self._buffers: Dict[Hashable, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._lengths: Dict[Hashable, int] = {}
        self.cursor = 0
        self.seq_len = 0  # tokens already cached (the position offset of the next forward)

    def begin(self) -> None:
        self.cursor = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's keys/values in the next slot of application order; return its full tensors."""
        key = self.cursor
        self.cursor += 1
        return self.write(key, k, v)

    def write(self, key: Hashable, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's keys/values [B, heads, T, head_dim] in slot `key` at positions seq_len..+T and
        return the slot's keys/values of positions 0..seq_len+T."""
        start, end = self.seq_len, self.seq_len + k.shape[2]
        buf = self._buffers.get(key)
        if buf is None or buf[0].shape[2] < end:
            size = max(end, self.capacity, 2 * buf[0].shape[2] if buf is not None else 0)
            new = tuple(t.new_empty(t.shape[0], t.shape[1], size, t.shape[3]) for t in (k, v))
            if buf is not None:
                for old, grown in zip(buf, new):
                    grown[:, :, :start] = old[:, :, :start]
            buf = self._buffers[key] = new
        buf[0][:, :, start:end] = k
        buf[1][:, :, start:end] = v
        self._lengths[key] = end
        return buf[0][:, :, :end], buf[1][:, :, :end]

    def read(self, key: Hashable) -> Tuple[torch.Tensor, torch.Tensor]:
        """Slot `key`'s keys/values of every position written so far (this forward's included)."""
        k, v = self._buffers[key]
        end = self._lengths[key]
        return k[:, :, :end], v[:, :, :end]

    def end(self, new_tokens: int) -> None:
        self.seq_len += new_tokens

    @property
    def slots(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Every slot's (keys, values) of the positions cached, in the order the slots were first written."""
        return [self.read(key) for key in self._buffers]

    def nbytes(self) -> int:
        """Bytes of the cached entries (every slot's keys and values of the positions written)."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.slots)
