"""This process's place in torch.distributed, with or without a process group (a world of one).

The checkpoint writer and the trainer both ask "which rank am I, and wait for the others"; these three
calls answer it whether or not torch.distributed has been initialised. `free_port()` is the one way
the package, the tests and bench/ pick a rendezvous port (MASTER_PORT) on this machine. torch is
imported only when a rank question is asked, so the launcher can use `free_port` without it.
"""
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it; another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1
