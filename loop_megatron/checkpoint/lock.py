"""The save folder's lock: one live training run writes a `--save` folder at a time.

    <save>/lock     {"host", "boot_id", "pid", "pid_start", "started", "command"} (JSON, written atomically:
                    temp file + rename); its modification time is refreshed every 60 s while held

Global rank 0 of a run takes the lock at setup and removes it at exit (the trainer's close(), which also
runs after an exception or a SIGTERM/SIGINT stop, and an atexit hook); the other ranks never touch it.
The check-and-take runs under an flock of the save folder itself, so two runs starting together on one
host cannot both take it (where the filesystem refuses flock on a folder, e.g. some NFS setups, it runs
without; the temp + rename write still never leaves a half-written lock). An existing lock is judged so:

- held by this process (a second run in the same Python process, e.g. tests): taken again;
- same host (same hostname and kernel boot id): the holder is alive when `os.kill(pid, 0)` succeeds and
  its process start time (/proc/<pid>/stat) is the recorded one (so a reused pid does not count): then
  the folder is refused in one sentence naming host, pid and start time; a dead holder's lock is taken
  over with a note;
- another host (or the same hostname after a reboot, or in another container): its liveness cannot be
  checked from here, so the lock is refused while it is fresh, and taken over with a note once it has not
  been refreshed for `STALE_AFTER_S` (5 minutes: a live holder refreshes it every 60 s, from a thread, so
  long saves and evaluations keep it fresh). `training.force_save_lock` (`--force-save-lock`) takes it
  over at once (the user's word that the other run is gone).

Tools that only read a checkpoint (conversion, evaluation, checkpoint_info, `--load` of another run's
folder) take no lock.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional

from ..utils import fs
from .layout import CheckpointError

LOCK_FILE = "lock"
REFRESH_S = 60.0
STALE_AFTER_S = 300.0


class SaveFolderBusy(CheckpointError):
    """The save folder is held by another live run."""


def lock_path(save_dir: str) -> str:
    return os.path.join(save_dir, LOCK_FILE)


@contextlib.contextmanager
def _folder_flock(folder: str) -> Iterator[None]:
    """An exclusive flock of `folder` for the block (the kernel drops it if this process dies)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the flock


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def process_start(pid: int) -> Optional[int]:
    """The start time of process `pid` in clock ticks since boot (/proc/<pid>/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
        return int(text[text.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int, start: Optional[int] = None) -> bool:
    """True when process `pid` runs on this host (and, when `start` is known, is the same process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    except OSError:
        return False
    if start is not None:
        now = process_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused by another process
    return True


def _record() -> Dict[str, Any]:
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
            "pid_start": process_start(os.getpid()),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500]}


def read_lock(save_dir: str) -> Optional[Dict[str, Any]]:
    """The lock record of `save_dir`, None when there is none; an unreadable file reads as {}."""
    path = lock_path(save_dir)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        record = record if isinstance(record, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        record = {}
    try:
        record["_age_s"] = time.time() - os.stat(path).st_mtime
    except OSError:
        pass
    return record


def _holder(record: Dict[str, Any]) -> str:
    return (f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, started {record.get('started', '?')}")


def judge(record: Dict[str, Any], me: Dict[str, Any], force: bool = False) -> Optional[str]:
    """None when the lock `record` may be taken silently (it is this process's), "take: <why>" when it may
    be taken over with a note, "refuse: <why>" otherwise."""
    same_host = record.get("host") == me["host"] and record.get("boot_id") == me["boot_id"]
    if same_host and record.get("pid") == me["pid"] and record.get("pid_start") == me["pid_start"]:
        return None
    if not record.get("host") or not isinstance(record.get("pid"), int):
        return "take: the lock file was unreadable"
    if same_host:
        if pid_alive(record["pid"], record.get("pid_start")):
            return "refuse: it is running on this host"
        return "take: that process is no longer running"
    age = record.get("_age_s", 0.0)
    if force:
        return "take: --force-save-lock"
    if age > STALE_AFTER_S:
        return f"take: it runs on another host and its lock was last refreshed {age / 60:.0f} minutes ago"
    return (f"refuse: it runs on another host, where this run cannot check it, and refreshed its lock "
            f"{age:.0f} s ago")


class SaveLock:
    """The lock of one save folder, held by this process (see the module docstring)."""

    def __init__(self, save_dir: str, record: Dict[str, Any]):
        self.save_dir, self.record = save_dir, record
        self.path = lock_path(save_dir)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="save-lock-refresh", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    @classmethod
    def acquire(cls, save_dir: str, force: bool = False, note: Callable[[str], None] = print) -> "SaveLock":
        """Take the lock of `save_dir` (created if missing) or raise SaveFolderBusy naming the holder."""
        os.makedirs(save_dir, exist_ok=True)
        me = _record()
        with _folder_flock(save_dir):
            old = read_lock(save_dir)
            if old is not None:
                verdict = judge(old, me, force)
                if verdict is not None and verdict.startswith("refuse: "):
                    raise SaveFolderBusy(
                        f"{save_dir}: this save folder is in use by another run ({_holder(old)}; "
                        f"{verdict[len('refuse: '):]}); stop that run or pick another --save folder"
                        + ("" if old.get("host") == me["host"] else
                           ", or pass --force-save-lock if you know it has ended") + ".")
                if verdict is not None:
                    note(f"note: took over the lock of {save_dir} from {_holder(old)}: {verdict[len('take: '):]}")
            fs.write_json(lock_path(save_dir), me, indent=1, trailing_newline=True)
        return cls(save_dir, me)

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def held(self) -> bool:
        """The lock file still names this process."""
        record = read_lock(self.save_dir)
        return bool(record) and all(record.get(k) == self.record[k] for k in ("host", "pid", "pid_start", "started"))

    def release(self) -> None:
        """Stop refreshing and remove the lock file if it is still this process's (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            atexit.unregister(self.release)
        except Exception:
            pass
        try:
            with _folder_flock(self.save_dir):
                if self.held():
                    fs.remove_quietly(self.path)
        except OSError:
            pass
