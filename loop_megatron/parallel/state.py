"""Process groups for tensor parallelism (TP) and data parallelism (DP).

Ranks are laid out Megatron-style with TP ranks adjacent: for world size 4 and TP size 2 the TP groups
are {0,1} and {2,3}, and the DP groups {0,2} and {1,3}. Adjacent TP ranks land on the same node, where
the TP all-reduces (two per block) are cheapest.

Without torch.distributed initialised (a plain single-process run, or a unit test) every query
answers as a world of one, so the TP layers degrade to ordinary local layers.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Optional

import torch.distributed as dist

_TP_GROUP = None
_DP_GROUP = None
_TP_SIZE = 1


def initialize_model_parallel(tensor_model_parallel_size: int = 1, timeout: Optional[timedelta] = None) -> None:
    """Create the TP and DP groups. Every rank must call this with the same arguments. A collective on
    either group waits at most `timeout` (--distributed-timeout-minutes) for a rank; None: torch's
    default for new groups (which training.distributed.init_distributed sets to the same bound)."""
    global _TP_GROUP, _DP_GROUP, _TP_SIZE
    if not dist.is_initialized():
        if tensor_model_parallel_size != 1:
            raise RuntimeError("tensor_model_parallel_size > 1 needs torch.distributed to be initialised first.")
        _TP_SIZE = 1
        return
    world = dist.get_world_size()
    tp = tensor_model_parallel_size
    if world % tp != 0:
        raise RuntimeError(f"tensor_model_parallel_size ({tp}) must divide the world size ({world}).")
    rank = dist.get_rank()
    # All ranks create every group in the same order (a torch.distributed requirement).
    for start in range(0, world, tp):
        ranks = list(range(start, start + tp))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            _TP_GROUP = group
    for offset in range(tp):
        ranks = list(range(offset, world, tp))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            _DP_GROUP = group
    _TP_SIZE = tp


def destroy_model_parallel() -> None:
    """Forget the groups (tests call this between configurations)."""
    global _TP_GROUP, _DP_GROUP, _TP_SIZE
    _TP_GROUP = _DP_GROUP = None
    _TP_SIZE = 1


def model_parallel_is_initialized() -> bool:
    return _TP_GROUP is not None


def get_tensor_model_parallel_group() -> Optional[dist.ProcessGroup]:
    return _TP_GROUP


def get_data_parallel_group() -> Optional[dist.ProcessGroup]:
    return _DP_GROUP


def get_tensor_model_parallel_world_size() -> int:
    if _TP_GROUP is None:
        return 1
    return dist.get_world_size(_TP_GROUP)


def get_tensor_model_parallel_rank() -> int:
    if _TP_GROUP is None:
        return 0
    return dist.get_rank(_TP_GROUP)


def get_data_parallel_world_size() -> int:
    if _DP_GROUP is None:
        return dist.get_world_size() if dist.is_initialized() else 1
    return dist.get_world_size(_DP_GROUP)


def get_data_parallel_rank() -> int:
    if _DP_GROUP is None:
        return dist.get_rank() if dist.is_initialized() else 0
    return dist.get_rank(_DP_GROUP)


class ModelParallelUnit:
    """The `mpu` object handed to `deepspeed.initialize`.

    DeepSpeed asks it for the model-parallel (= tensor-parallel here) and data-parallel groups so that
    ZeRO partitions and gradient all-reduces run over DP ranks only, and gradient norms count each
    TP-replicated parameter once. Both the old (`get_model_parallel_*`) and new
    (`get_tensor_model_parallel_*`) spellings are provided; pipeline parallelism is not used (size 1).
    """

    # Model-parallel == tensor-parallel here.
    def get_model_parallel_group(self):
        return get_tensor_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self) -> int:
        return get_tensor_model_parallel_rank()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_data_parallel_group(self):
        return get_data_parallel_group()

    def get_data_parallel_world_size(self) -> int:
        return get_data_parallel_world_size()

    def get_data_parallel_rank(self) -> int:
        return get_data_parallel_rank()

    # No pipeline parallelism: a pipeline of one stage.
    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_group(self):
        return None
