"""The save folder's lock: a live holder is refused in one sentence naming it, a dead one's lock is taken
over with a note, another host's lock is refused until stale (or --force-save-lock), released at exit."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from loop_megatron.checkpoint.lock import STALE_AFTER_S, SaveFolderBusy, SaveLock, lock_path, process_start, read_lock


def _write_lock(save, **record):
    os.makedirs(save, exist_ok=True)
    with open(lock_path(save), "w") as f:
        json.dump(record, f)


def _mine(pid, **extra):
    from loop_megatron.checkpoint.lock import _boot_id

    return dict(host=socket.gethostname(), boot_id=_boot_id(), pid=pid, pid_start=process_start(pid),
                started="2026-12-01T10:00:00+00:00", **extra)


def test_live_holder_on_this_host_is_refused_naming_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        save = str(tmp_path / "ck")
        _write_lock(save, **_mine(holder.pid))
        with pytest.raises(SaveFolderBusy) as err:
            SaveLock.acquire(save)
        msg = str(err.value)
        assert f"pid {holder.pid}" in msg and socket.gethostname() in msg and "2026-12-01T10:00:00" in msg, msg
        assert "in use by another run" in msg and "\n" not in msg
        assert read_lock(save)["pid"] == holder.pid  # untouched
    finally:
        holder.kill()
        holder.wait()


def test_dead_holder_is_taken_over_with_a_note_and_released(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    save = str(tmp_path / "ck")
    _write_lock(save, **_mine(dead.pid))
    notes = []
    lock = SaveLock.acquire(save, note=notes.append)
    assert len(notes) == 1 and "took over" in notes[0] and f"pid {dead.pid}" in notes[0] and "no longer running" in notes[0]
    assert read_lock(save)["pid"] == os.getpid() and lock.held()
    lock.release()
    assert not os.path.exists(lock_path(save))


def test_reused_pid_counts_as_dead(tmp_path):
    save = str(tmp_path / "ck")
    _write_lock(save, **dict(_mine(os.getppid()), pid_start=1))  # a live pid, but not the process that locked
    notes = []
    SaveLock.acquire(save, note=notes.append).release()
    assert notes and "no longer running" in notes[0]


def test_other_host_refused_while_fresh_taken_when_stale_or_forced(tmp_path):
    save = str(tmp_path / "ck")
    _write_lock(save, host="node-elsewhere", boot_id="x", pid=4242, pid_start=7, started="2026-12-01T09:00:00+00:00")
    with pytest.raises(SaveFolderBusy) as err:
        SaveLock.acquire(save)
    assert "host node-elsewhere, pid 4242" in str(err.value) and "--force-save-lock" in str(err.value)
    notes = []
    SaveLock.acquire(save, force=True, note=notes.append).release()
    assert "--force-save-lock" in notes[0]
    _write_lock(save, host="node-elsewhere", boot_id="x", pid=4242, pid_start=7, started="2026-12-01T09:00:00+00:00")
    old = time.time() - STALE_AFTER_S - 60
    os.utime(lock_path(save), (old, old))
    notes = []
    SaveLock.acquire(save, note=notes.append).release()
    assert "last refreshed" in notes[0]


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    save = str(tmp_path / "ck")
    lock = SaveLock.acquire(save)
    _write_lock(save, host="node-elsewhere", boot_id="x", pid=1, pid_start=1, started="later")
    lock.release()
    assert read_lock(save)["host"] == "node-elsewhere"


def test_trainer_refuses_a_held_save_folder_before_building_anything(tmp_path):
    from loop_megatron.training import RunOptions, pretrain
    from tests.training.helpers import tiny_config, write_corpus

    prefix = write_corpus(str(tmp_path / "data"))
    save = str(tmp_path / "ck")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(save, **_mine(holder.pid))
        with pytest.raises(SaveFolderBusy, match=f"pid {holder.pid}"):
            pretrain(tiny_config(prefix, str(tmp_path / "run"), **{"training.save": save}), RunOptions())
    finally:
        holder.kill()
        holder.wait()
    assert read_lock(save)["pid"] == holder.pid  # the refused run did not touch it
    result = pretrain(tiny_config(prefix, str(tmp_path / "run"), **{"training.save": save, "training.train_iters": 1}),
                      RunOptions())  # the holder is dead now: taken over, run, released
    assert result["iterations"] == 1 and not os.path.exists(lock_path(save))
