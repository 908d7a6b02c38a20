"""Run a function on N gloo processes and collect each rank's return value.

Usage in a test:  results = run_distributed(_worker, 2, arg1, arg2)
The worker is called as worker(rank, world_size, *args) after torch.distributed is initialised with
gloo; it must be a module-level function (it is pickled into spawned processes). Return values must be
picklable (tensors are fine). A failure on any rank fails the test with that rank's traceback.
"""
from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loop_megatron.utils.distributed import free_port


def _entry(rank, world_size, port, result_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    path = os.path.join(result_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # report any failure to the parent, then re-raise
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args):
    """Spawn `world_size` processes running fn(rank, world_size, *args); return the list of results."""
    with tempfile.TemporaryDirectory() as result_dir:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_entry, args=(r, world_size, free_port_cached(), result_dir, fn, args))
                 for r in range(world_size)]
        _PORT_CACHE.clear()
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        results = []
        for r in range(world_size):
            path = os.path.join(result_dir, f"rank{r}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} exited with code {procs[r].exitcode} and no result")
            record = torch.load(path, weights_only=False)
            if not record["ok"]:
                raise RuntimeError(f"rank {r} failed:\n{record['error']}")
            results.append(record["result"])
        return results


_PORT_CACHE = []


def free_port_cached() -> int:
    """One port shared by every rank of the run being spawned."""
    if not _PORT_CACHE:
        _PORT_CACHE.append(free_port())
    return _PORT_CACHE[0]
