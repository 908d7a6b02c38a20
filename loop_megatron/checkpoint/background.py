"""Asynchronous checkpoint writes (training.async_save, Megatron's --async-save): one write at a time in a
background thread of global rank 0, while training goes on.

The save itself (checkpoint/engine.py) first takes a snapshot synchronously: every rank joins the gathers
of the fp32 masters and AdamW moments into CPU memory and writes its own small RNG file, so the next step
may change the parameters and optimizer state freely. What is left is rank 0's file writes (universal/
params, model.pt, state.json, meta.json, each fsynced), the rename of `iter_XXXXXXX.tmp/` to its tag,
then `latest` and pruning: that job runs here. Until it completes the folder keeps its `.tmp` name and
`latest` names the previous checkpoint, so a process killed during the write (even kill -9) never leaves
a checkpoint that looks complete; the next save prunes the stale `.tmp` folder.

A failed write (disk full, I/O error) removes its partial folder and is reported as one
CheckpointWriteError sentence naming the path: on rank 0 at the next step (`poll`), and on every rank at
the next save or the end of training (`wait_for_background`, collective), so the run exits non-zero. The
next save, the end of training and `Trainer.close` (before the save folder's lock is released) wait for
the pending write.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional


class BackgroundWriter:
    """Runs checkpoint write jobs one at a time in a daemon thread; remembers the first job's failure.

    A job is a callable returning None on success or the failure's sentence (it must not raise for a
    write error; any other exception is turned into a sentence too, naming its type). `slow_s` (a testing
    aid, RunOptions.debug_slow_save) is handed to the job to sleep before each file it writes."""

    def __init__(self, slow_s: float = 0.0):
        self.slow_s = slow_s
        self._thread: Optional[threading.Thread] = None
        self._failure: Optional[str] = None
        self._label = ""
        self.started_at = 0.0
        self.finished_s: Optional[float] = None
        """Seconds the last finished job took (for the log), None while one runs or before the first."""

    @property
    def label(self) -> str:
        """The tag of the last job submitted ("" before the first)."""
        return self._label

    @property
    def pending(self) -> bool:
        """A job is running."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, label: str, job: Callable[[], Optional[str]]) -> None:
        """Start `job` in the background after the previous one finished (its failure is kept for
        `take_failure`)."""
        self.join()
        self._label, self.started_at, self.finished_s = label, time.perf_counter(), None

        def run():
            try:
                message = job()
            except BaseException as exc:  # noqa: BLE001 - a background failure must reach the trainer
                message = f"the background write of {label} failed ({type(exc).__name__}: {exc})"
            self.finished_s = time.perf_counter() - self.started_at
            if message and self._failure is None:
                self._failure = message

        self._thread = threading.Thread(target=run, name=f"checkpoint-writer {label}", daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Wait for the running job (if any)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def take_failure(self) -> Optional[str]:
        """The failure sentence of a finished job (cleared once taken), or None."""
        message, self._failure = self._failure, None
        return message

    def poll(self) -> Optional[str]:
        """Without waiting: the failure sentence of a job that has finished, or None."""
        if self.pending:
            return None
        return self.take_failure()

    def sleep(self) -> None:
        """The testing aid's delay before each file a job writes."""
        if self.slow_s > 0:
            time.sleep(self.slow_s)
