"""This machine: visible GPUs, usable CPU cores, the environment a CPU-only launch needs (a free port:
`loop_megatron.utils.distributed.free_port`)."""
from __future__ import annotations

import os
from typing import Dict, Optional


def gpu_count() -> int:
    """CUDA devices visible here (0 on a CPU-only machine or without a CUDA build of torch)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver counts as no GPU
        return 0


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_environment(procs_per_node: int, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment additions for a CPU-only launch (nothing already set is overwritten).

    * DS_ACCELERATOR=cpu: DeepSpeed's CPU accelerator (it would fall back to it anyway, with a warning);
      its communication backend is then gloo, so no oneCCL/CCL_* setting is needed.
    * OMP_NUM_THREADS / MKL_NUM_THREADS: each rank gets its share of the cores; otherwise every rank
      starts one thread per core and they fight over the same cores.
    """
    base = os.environ if base is None else base
    threads = str(max(1, cpu_cores() // max(1, procs_per_node)))
    wanted = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    return {k: v for k, v in wanted.items() if k not in base}

