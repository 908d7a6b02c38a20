"""Counting all-gather collectives (calls and bytes) while a block of code runs.

    with AllGatherCounter() as counter:
        train_step(...)
    counter.calls, counter.bytes

Wraps every entry point an all-gather can take on this rank: torch.distributed's `all_gather`,
`all_gather_into_tensor` and `_all_gather_base`, and the function object DeepSpeed's torch backend
caches at start-up (`deepspeed.comm` keeps a reference to `all_gather_into_tensor`, so patching
torch.distributed alone would miss ZeRO-3's parameter gathers). Bytes are those of the gathered
output (what lands in this rank's memory). Used by the ZeRO-3 loop tests and bench/zero3_gather_bench.py.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d


def _out_bytes(args, kwargs, name: str) -> int:
    if name == "all_gather":
        tensors = kwargs.get("tensor_list", args[0] if args else [])
        return sum(t.numel() * t.element_size() for t in tensors)
    out = kwargs.get("output_tensor", args[0] if args else None)
    return out.numel() * out.element_size() if isinstance(out, torch.Tensor) else 0


class AllGatherCounter:
    """Context manager counting all-gathers on this rank; `by_name` splits calls per entry point."""

    def __init__(self):
        self.calls = 0
        self.bytes = 0
        self.by_name: Dict[str, int] = collections.Counter()
        self._patched: List[Tuple[Any, str, Callable]] = []
        self._depth = 0

    def _wrap(self, fn: Callable, name: str) -> Callable:
        if getattr(fn, "_gather_counter_original", None) is not None:
            fn = fn._gather_counter_original  # never stack wrappers

        def counted(*args, **kwargs):
            if self._depth:  # an entry point calling another (e.g. _all_gather_base): count once
                return fn(*args, **kwargs)
            self.calls += 1
            self.by_name[name] += 1
            self.bytes += _out_bytes(args, kwargs, name)
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        counted._gather_counter_original = fn
        return counted

    def _patch(self, owner: Any, attr: str, name: str) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:
            return
        self._patched.append((owner, attr, fn))
        setattr(owner, attr, self._wrap(fn, name))

    def __enter__(self) -> "AllGatherCounter":
        for owner in (dist, c10d):
            self._patch(owner, "all_gather", "all_gather")
            self._patch(owner, "all_gather_into_tensor", "all_gather_into_tensor")
            self._patch(owner, "_all_gather_base", "all_gather_into_tensor")
        try:
            import deepspeed.comm.comm as ds_comm
        except ImportError:
            ds_comm = None
        cdb = getattr(ds_comm, "cdb", None) if ds_comm is not None else None
        if cdb is not None and getattr(cdb, "all_gather_function", None) is not None:
            self._patch(cdb, "all_gather_function", "all_gather_into_tensor")
        return self

    def __exit__(self, *exc) -> bool:
        for owner, attr, fn in reversed(self._patched):
            setattr(owner, attr, fn)
        self._patched.clear()
        return False
