"""MPI-style hostfiles (`HOST slots=N` per line, `#` comments): parse, read, write, and tell local hosts.

A bad line or a missing file is reported with one sentence naming the file and line before anything
starts (DeepSpeed itself would silently fall back to this machine).
"""
from __future__ import annotations

import collections
import os
import re
import socket
from typing import Dict

from ..utils import fs
from .errors import LaunchError

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
_HOST_LINE = re.compile(r"^(?P<host>[^\s=#]+)\s+slots\s*=\s*(?P<slots>\S+)(?P<rest>(\s+\S+=\S+)*)\s*$")


def parse_hostfile_text(text: str, source: str = "hostfile") -> "collections.OrderedDict[str, int]":
    """Parse MPI-style hostfile text into {host: slots}, in file order.

    Each non-blank line is `HOSTNAME slots=N`, optionally followed by other `key=value` fields (kept by
    MPI, ignored here) and a `# comment`; lines starting with `#` are comments. A bad line, a duplicate
    host, zero slots or a file naming no host raises LaunchError naming the file and line.
    """
    hosts: "collections.OrderedDict[str, int]" = collections.OrderedDict()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOST_LINE.match(line)
        if not match:
            raise LaunchError(f"{source}, line {number}: expected 'HOSTNAME slots=N', got {raw.strip()!r}.")
        host, slots_text = match.group("host"), match.group("slots")
        if not slots_text.isdigit() or int(slots_text) < 1:
            raise LaunchError(f"{source}, line {number}: slots must be a whole number >= 1, got {slots_text!r}.")
        if host in hosts:
            raise LaunchError(f"{source}, line {number}: host {host!r} is listed twice (DeepSpeed needs one line per host).")
        hosts[host] = int(slots_text)
    if not hosts:
        raise LaunchError(f"{source}: names no host; add a line like 'localhost slots=2'.")
    return hosts


def read_hostfile(path: str) -> "collections.OrderedDict[str, int]":
    """Read and check a hostfile; a missing file is one sentence, never DeepSpeed's silent local fallback."""
    if not os.path.isfile(path):
        raise LaunchError(f"hostfile {path} does not exist; create it (see launch/hostfile.example) "
                          f"or leave out --hostfile to run on this machine only.")
    with open(path, encoding="utf-8") as f:
        return parse_hostfile_text(f.read(), source=f"hostfile {path}")


def format_hostfile(hosts: Dict[str, int]) -> str:
    return "".join(f"{host} slots={slots}\n" for host, slots in hosts.items())


def write_hostfile(path: str, hosts: Dict[str, int]) -> str:
    """Write {host: slots} as a hostfile (temporary name, then rename); return the path."""
    return fs.write_text(path, format_hostfile(hosts))


def is_local_host(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return host in (socket.gethostname(), socket.getfqdn())
    except OSError:
        return False
