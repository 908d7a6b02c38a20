"""ZeRO-3 and the shared loop: keep only the loop's parameters gathered across their uses.

ZeRO-3 gathers a parameter before each module's forward or backward and releases it after, unless the
module trace recorded in step 1 shows it used again within `stage3_max_reuse_distance` elements of
parameters (DeepSpeed's PartitionedParameterCoordinator walks the upcoming modules, summing their
parameters' sizes, and keeps those it meets before the sum passes the distance). The shared blocks of
the loop are used once per iteration: between two uses of one of them the trace holds the loop's other
parameters only, so a distance of the loop's own size keeps them gathered for all N iterations (one
gather per step, whatever N). Embeddings, prelude and coda are next used at least a whole loop later
(the head after the last iteration, the backward after the head), so a distance just above the loop's
size releases them as DeepSpeed would. The old default (1e9 elements, DeepSpeed's own) kept every
parameter gathered until the step ended: at the step peak each rank held the whole unpartitioned model,
which defeats ZeRO-3 for the models that need it.

`loop_reuse_distance(model)` is the distance the trainer sets when the DeepSpeed config does not set one
(training/ds_config.py); `GatheredParameterPeak` measures what is resident (bench/zero3_gather_bench.py,
tests/training/test_zero3_gathers.py).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Above 1: the loop's gates and injection sit between two uses of a block as well (they are inside
# model.loop, so counted), and DeepSpeed counts whole modules, so a module that straddles the boundary
# must not push the first block out. Below 2: one loop's size more would already reach past the head
# into the backward and keep the prelude and embeddings too, for models whose loop is as big as they.
REUSE_MARGIN = 1.25


def loop_reuse_distance(model: torch.nn.Module) -> Optional[int]:
    """The stage3_max_reuse_distance (elements) that keeps `model.loop`'s parameters gathered across the
    loop's iterations and releases the rest after use; None for a model without a loop stack. Counted on
    this rank's tensor-parallel shards, as DeepSpeed counts `ds_numel`."""
    loop = getattr(model, "loop", None)
    if loop is None:
        return None
    numel = sum(p.numel() for p in loop.parameters())
    return max(1, int(numel * REUSE_MARGIN))


class _SampleGathered(TorchDispatchMode):
    def __init__(self, params: List[torch.nn.Parameter]):
        super().__init__()
        self.params = params
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        now = gathered_numel(self.params)
        if now > self.peak:
            self.peak = now
        return out


def gathered_numel(params: List[torch.nn.Parameter]) -> int:
    """Elements of ZeRO-3 parameters that are gathered (whole) on this rank right now; persistent ones
    (below stage3_param_persistence_threshold, never partitioned) included."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return sum(p.ds_numel for p in params if getattr(p, "ds_status", None) != ZeroParamStatus.NOT_AVAILABLE)


class GatheredParameterPeak:
    """Context manager: `peak` is the largest number of gathered ZeRO-3 parameter elements on this rank
    after any ATen operation inside the block (sampled through a TorchDispatchMode, so the gathers of
    the forward, the backward and any recomputation are all seen). A test and bench aid: it walks the
    parameter list after every operation."""

    def __init__(self, module: torch.nn.Module):
        self.params = [p for p in module.parameters() if hasattr(p, "ds_status")]
        self.peak = 0
        self._mode: Optional[_SampleGathered] = None

    def __enter__(self) -> "GatheredParameterPeak":
        self._mode = _SampleGathered(self.params)
        self._mode.peak = gathered_numel(self.params)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        assert self._mode is not None
        self._mode.__exit__(*exc)
        self.peak = self._mode.peak
