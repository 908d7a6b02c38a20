"""Process setup: a world of one without a launcher, DeepSpeed's distributed init, device choice.

Backend and device are detected, never configured: NCCL and cuda:LOCAL_RANK when CUDA is available,
gloo and CPU otherwise. `rank()`, `world_size()` and `barrier()` live in `loop_megatron.utils.distributed`
(the checkpoint writer needs them too).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..utils.distributed import free_port


def ensure_env(local_rank: Optional[int] = None) -> None:
    """Fill in RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for a plain single-process run.

    Launchers (deepspeed, torchrun) set these themselves; without them DeepSpeed would look for MPI.
    """
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank if local_rank is not None else 0)


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def use_cuda() -> bool:
    return torch.cuda.is_available()


def backend_name() -> str:
    return "nccl" if use_cuda() else "gloo"


def device() -> torch.device:
    if use_cuda():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def skip_shm_comm_build() -> None:
    """Stop DeepSpeed from JIT-building its shared-memory CPU all-reduce op (~60 s on first use).

    `deepspeed.comm`'s torch backend builds `deepspeed_shm_comm` whenever it is marked compatible, but
    only its inference all-reduce uses it; training collectives go through torch.distributed. DeepSpeed
    keeps the compatibility table in one module-level dict that it documents as persistent, so marking
    the op incompatible there makes the backend skip it.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(local_rank: Optional[int] = None, skip_shm_comm: bool = True) -> None:
    """torch.distributed through deepspeed.init_distributed (idempotent), CUDA device selection."""
    import deepspeed

    ensure_env(local_rank)
    if use_cuda():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    elif skip_shm_comm:
        skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend=backend_name(), auto_mpi_discovery=False)

