"""This process's place in torch.distributed, with or without a process group (a world of one).

The checkpoint writer and the trainer both ask "which rank am I, and wait for the others"; these three
calls answer it whether or not torch.distributed has been initialised. `free_port()` is the one way
the package, the tests and bench/ pick a rendezvous port (MASTER_PORT) on this machine. torch is
imported only when a rank question is asked, so the launcher can use `free_port` without it.
"""
import ipaddress
import os
import socket
from typing import Callable, List, Optional


def loopback_address(name: str, resolve: Optional[Callable[[str], List[str]]] = None) -> Optional[str]:
    """The loopback address `name` resolves to here (127.x.x.x, ::1), or None (a network address, or it
    does not resolve). `resolve` maps a name to its addresses (tests); default: the system resolver."""
    if resolve is None:
        def resolve(host: str) -> List[str]:
            return [info[4][0] for info in socket.getaddrinfo(host, None)]
    try:
        addresses = resolve(name)
    except (OSError, UnicodeError):
        return None
    for address in addresses:
        try:
            if ipaddress.ip_address(address.split("%", 1)[0]).is_loopback:
                return address
        except ValueError:
            continue
    return None


def hostname_loopback_warning(hostname: Optional[str] = None, environ=None,
                              resolve: Optional[Callable[[str], List[str]]] = None) -> Optional[str]:
    """The warning for a node of a multi-node job whose hostname resolves to loopback while gloo would pick
    its address from that name (GLOO_SOCKET_IFNAME unset): the other nodes would be told to reach it at
    127.x, so one rank fails and the others wait for the timeout. None when nothing is wrong."""
    environ = os.environ if environ is None else environ
    if environ.get("GLOO_SOCKET_IFNAME"):
        return None
    hostname = hostname or socket.gethostname()
    address = loopback_address(hostname, resolve)
    if address is None:
        return None
    return (f"this node's hostname {hostname} resolves to {address} (loopback), so gloo would advertise that "
            f"address to the other nodes and the job would hang until the timeout; map {hostname} to this node's "
            f"network address in /etc/hosts, or set GLOO_SOCKET_IFNAME to its network interface (e.g. "
            f"GLOO_SOCKET_IFNAME=eth0; launch/train.sh passes it to every rank).")


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
