"""Process setup: a world of one without a launcher, DeepSpeed's distributed init, device choice.

Backend and device are detected, never configured: NCCL and cuda:LOCAL_RANK when CUDA is available,
gloo and CPU otherwise. `rank()`, `world_size()` and `barrier()` live in `loop_megatron.utils.distributed`
(the checkpoint writer needs them too).
"""
from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from typing import Optional

import torch

from ..errors import LoopMegatronError
from ..utils.distributed import free_port, hostname_loopback_warning


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


class RankStopped(LoopMegatronError):
    """Another rank of the job died, hung or failed first; the message names its rank and host and has
    already been printed once for the whole job (by the rank watchdog), so `printed` is True."""

    printed = True


def spans_nodes() -> bool:
    """Whether this job's ranks run on more than one node (DeepSpeed's CROSS_SIZE, torchrun's
    WORLD_SIZE > LOCAL_WORLD_SIZE)."""
    if int(os.environ.get("CROSS_SIZE", "1")) > 1:
        return True
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
    return local is not None and env_world_size() > int(local)


def set_default_group_timeout(timeout: timedelta) -> None:
    """Make `timeout` the one torch.distributed gives every process group created without `timeout=`.

    DeepSpeed creates groups of its own (`deepspeed.comm.new_group(ranks)`, e.g. for ZeRO and sequence
    parallelism) with no timeout argument, and torch then uses the module-level default of
    `torch.distributed.distributed_c10d` (30 minutes; DEEPSPEED_TIMEOUT does not change it); this replaces
    that default, so those groups also end within --distributed-timeout-minutes."""
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout") and c10d.default_pg_nccl_timeout is not None:
        c10d.default_pg_nccl_timeout = timeout


def init_distributed(local_rank: Optional[int] = None, skip_shm_comm: bool = True,
                     timeout_minutes: float = 10.0) -> None:
    """torch.distributed through deepspeed.init_distributed (idempotent), CUDA device selection; the
    world group and every group created later without an explicit timeout wait at most `timeout_minutes`."""
    import deepspeed

    ensure_env(local_rank)
    if use_cuda():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    elif skip_shm_comm:
        skip_shm_comm_build()
    if spans_nodes() and not use_cuda() and os.environ.get("LOCAL_RANK", "0") == "0":
        warning = hostname_loopback_warning()
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    timeout = timedelta(minutes=timeout_minutes)
    set_default_group_timeout(timeout)
    deepspeed.init_distributed(dist_backend=backend_name(), auto_mpi_discovery=False, timeout=timeout)


def start_watchdog(timeout_minutes: float):
    """This rank's RankWatchdog (utils/watchdog.py) on a store client of its own at MASTER_ADDR:MASTER_PORT
    (the rendezvous store, served by rank 0), started; None in a world of one."""
    import torch.distributed as dist

    from ..utils.watchdog import RankWatchdog

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    timeout_s = timeout_minutes * 60
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    return RankWatchdog(store, dist.get_rank(), dist.get_world_size(), timeout_s, host=socket.gethostname()).start()


def rank_report() -> str:
    """One line of this rank's place and CPU settings, as every rank prints it at start: which accelerator
    DeepSpeed picked, the threads torch uses, and the environment settings the launcher passes on."""
    from deepspeed.accelerator import get_accelerator

    import torch.distributed as dist

    r, w = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    settings = " ".join(f"{k}={os.environ.get(k, '-')}" for k in
                        ("DS_ACCELERATOR", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GLOO_SOCKET_IFNAME",
                         "NCCL_SOCKET_IFNAME"))
    return (f"rank {r}/{w} on host {socket.gethostname()} (local rank {os.environ.get('LOCAL_RANK', '0')}): "
            f"accelerator {get_accelerator().device_name()}, torch threads {torch.get_num_threads()}, {settings}")

