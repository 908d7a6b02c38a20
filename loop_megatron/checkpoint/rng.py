"""Each rank's random-number state (python, numpy, torch, cuda), saved beside a checkpoint and restored on
resume, so a resumed run draws the same dropout masks and samples as an uninterrupted one."""
from __future__ import annotations

import os
import random
from typing import Any, Dict

import numpy as np
import torch

from ..utils import fs
from .layout import rng_path


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rng(folder: str, rank: int, fsync: bool = False) -> None:
    """Write this rank's RNG state into the checkpoint folder (rng/rank_XXXXX.pt)."""
    path = rng_path(folder, rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fs.torch_save(rng_state(), path, fsync=fsync)


def restore_rng(folder: str, rank: int) -> bool:
    """Restore this rank's RNG state from the checkpoint folder; False when it holds none for this rank."""
    path = rng_path(folder, rank)
    if not os.path.isfile(path):
        return False
    set_rng_state(torch.load(path, weights_only=False))
    return True


def reseed(seed: int, iteration: int) -> None:
    """Seed every RNG from (seed, iteration), the same on all ranks (TP ranks need equal streams for
    replicated dropout, as a fresh run has): used where per-rank RNG states cannot be restored because
    the layout changed. Deterministic, so two resumptions on the same new layout draw the same masks."""
    from ..parallel import set_seed

    set_seed((int(seed) * 1_000_003 + int(iteration) * 7_919 + 17) % (2 ** 63 - 1))
