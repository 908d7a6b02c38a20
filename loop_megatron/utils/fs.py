"""The one place that writes files atomically: temporary names, atomic renames and an inter-process lock.

Everything the package writes (datasets, index caches, checkpoints, run summaries, reports, hostfiles)
goes to a temporary sibling first and is renamed into place only when complete, so a crash or a
concurrent reader never sees a half-written file under its final name. `os.replace` is atomic within
one filesystem, which is why the temporary name is always in the same folder as the target.

* `atomic_path(path)`: the general form; yields a temporary name to write to, renames it on success and
  deletes it on failure. `atomic_open(path)` is the same with an open file object.
* `write_text`, `write_bytes`, `write_json`, `torch_save`: one-call writers built on `atomic_path`.
* `temp_dir_beside(path)`, `replace_dir(src, dst)`: build a folder under a temporary name, then put it
  in place of `dst` (an existing `dst` is deleted first; a folder cannot be swapped in one rename).
* `temp_path`, `remove_quietly`, `exclusive_lock`: the building blocks, for writers that stream into a
  temporary file themselves (the indexed-dataset builder).
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
import uuid
from typing import IO, Any, Iterator, Optional


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
def atomic_path(path: str, make_parent: bool = False) -> Iterator[str]:
    """Yield a temporary sibling of ``path`` to write; rename it onto ``path`` when the block ends
    normally, delete it when the block raises. ``make_parent`` creates the folder first."""
    if make_parent:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", *, fsync: bool = False, make_parent: bool = False,
                encoding: Optional[str] = None) -> Iterator[IO]:
    """`open` a temporary sibling of ``path`` (text modes default to UTF-8) and rename it onto ``path``
    once the block has written it whole. ``fsync`` forces the bytes to disk before the rename (for files
    a resume depends on, such as a checkpoint's meta.json and `latest`)."""
    if encoding is None and "b" not in mode:
        encoding = "utf-8"
    with atomic_path(path, make_parent=make_parent) as tmp:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def write_text(path: str, text: str, *, fsync: bool = False, make_parent: bool = False) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; return ``path``."""
    with atomic_open(path, "w", fsync=fsync, make_parent=make_parent) as f:
        f.write(text)
    return path


def write_bytes(path: str, data: bytes, *, fsync: bool = False, make_parent: bool = False) -> str:
    """Write ``data`` to ``path`` atomically; return ``path``."""
    with atomic_open(path, "wb", fsync=fsync, make_parent=make_parent) as f:
        f.write(data)
    return path


def write_json(path: str, obj: Any, *, indent: Optional[int] = 2, trailing_newline: bool = False,
               fsync: bool = False, make_parent: bool = False) -> str:
    """Write ``obj`` as JSON to ``path`` atomically; return ``path``."""
    text = json.dumps(obj, indent=indent) + ("\n" if trailing_newline else "")
    return write_text(path, text, fsync=fsync, make_parent=make_parent)


def torch_save(obj: Any, path: str, *, fsync: bool = False) -> str:
    """``torch.save(obj)`` to ``path`` atomically; return ``path``. ``fsync`` forces the bytes to disk
    before the rename."""
    import torch  # only the writers of tensors pay for importing torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
        if fsync:
            fsync_path(tmp)
    return path


def fsync_path(path: str) -> None:
    """Force a written file's bytes (or a folder's entries, e.g. after a rename in it) to disk. Filesystems
    that cannot fsync a folder (EINVAL on some network filesystems) are let be: nothing more can be done."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (os.path.isdir(path) and exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def temp_dir_beside(path: str) -> str:
    """Create and return an empty, uniquely named hidden folder next to ``path`` (same filesystem), in
    which a whole output folder can be built before `replace_dir` puts it in place."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.tmp-", dir=parent)


def replace_dir(src: str, dst: str) -> str:
    """Move the finished folder ``src`` to ``dst``, deleting an existing ``dst`` first; return ``dst``.

    The rename itself is atomic; between the delete and the rename ``dst`` is briefly absent, never
    half-written (readers that need a stable name go through a pointer file such as `latest`)."""
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.replace(src, dst)
    return dst


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
