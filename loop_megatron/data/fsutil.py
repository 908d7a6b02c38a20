"""Small filesystem helpers: temporary names, atomic renames and an inter-process lock.

Everything the data pipeline writes goes to a temporary name first and is renamed into place only
when complete, so a crash or a concurrent reader never sees a half-written file under its final name.
"""

import contextlib
import fcntl
import os
import uuid
from typing import Iterator


def temp_path(path: str) -> str:
    """Return a unique temporary sibling of ``path`` (same folder, so ``os.replace`` is atomic)."""
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_quietly(*paths: str) -> None:
    """Delete each path that exists, ignoring ones that are already gone."""
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


@contextlib.contextmanager
def exclusive_lock(lock_path: str) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``lock_path`` for the duration of the block.

    flock (rather than an O_EXCL marker file) is released by the kernel when the holder dies, so a
    crashed rank cannot leave a stale lock that makes every later run wait forever. The lock file itself
    is left in place: deleting it would race with a process that has just opened it.
    """
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
