"""Peak-memory measurement that works on CPU as well as CUDA.

On CUDA, `torch.cuda.max_memory_allocated` is exact. On CPU PyTorch keeps no allocator statistics, so
`PeakMemory` samples glibc's heap usage (mallinfo2: bytes in use in the arena plus mmap'd blocks, where
PyTorch's large tensors live) after every ATen operation through a TorchDispatchMode. Peaks inside a
single kernel's private scratch space are missed; everything that lives across operations (activations
saved for backward, gradients, recomputed checkpoints) is seen.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _load_mallinfo2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
        fn.restype = _MallInfo2
        return fn
    except (OSError, AttributeError):  # not glibc (macOS, musl): no CPU measurement
        return None


_MALLINFO2 = _load_mallinfo2()


def cpu_bytes_in_use() -> Optional[int]:
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


class _SampleAfterEachOp(TorchDispatchMode):
    def __init__(self, start: int):
        super().__init__()
        self.peak = start

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        now = cpu_bytes_in_use()
        if now is not None and now > self.peak:
            self.peak = now
        return out


class PeakMemory:
    """Context manager: `peak_bytes` is the peak memory above the level at entry.

        with PeakMemory(device) as meter:
            loss.backward()
        print(meter.peak_bytes)
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes: Optional[int] = None
        self._mode = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = cpu_bytes_in_use()
            if self._start is not None:
                self._mode = _SampleAfterEachOp(self._start)
                self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._mode is not None:
            self._mode.__exit__(*exc)
            self.peak_bytes = self._mode.peak - self._start
        return False


def time_and_peak(step, device: torch.device, repeats: int):
    """(median seconds, peak bytes) of `step()`: one warm-up call (which also allocates gradient buffers,
    so they are not counted as activations), `repeats` timed calls, then one call under `PeakMemory`."""
    import statistics
    import time

    step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    with PeakMemory(device) as meter:
        step()
    return statistics.median(times), meter.peak_bytes
