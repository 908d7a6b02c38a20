"""This process's place in torch.distributed, with or without a process group (a world of one).

The checkpoint writer and the trainer both ask "which rank am I, and wait for the others"; these three
calls answer it whether or not torch.distributed has been initialised.
"""
import torch.distributed as dist


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
