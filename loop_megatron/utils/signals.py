"""Stopping a run cleanly: the first SIGTERM/SIGINT asks the training loop to finish the step it is in,
save (with --save) and return; a second one exits at once.

One `StopRequest` per process (`STOP_REQUEST`). `python -m loop_megatron.train` installs it before it
imports torch, so a signal during start-up is not lost (nor a KeyboardInterrupt traceback); the trainer
installs it again (a no-op then) and reads `requested` at every step's all-reduce, which carries the flag
to every rank. The exit at once on a second signal (`os._exit`, status 128 + signal number: 130 for
SIGINT, 143 for SIGTERM) leaves the save folder's `latest` on the last complete checkpoint: `latest` is
only ever replaced by a rename after a checkpoint is whole (checkpoint/layout.py).

A second signal within `echo_seconds` of the first counts as the same request: DeepSpeed's own launcher
(`deepspeed ...` run by hand, Ctrl-C in its terminal) forwards a SIGTERM to ranks that the terminal's
SIGINT has just reached. Standard library only (imported before torch).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Dict, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
ECHO_SECONDS = 1.0


class StopRequest:
    """SIGTERM/SIGINT set `requested` (and `signal_name`, the first signal's name); a later one exits."""

    def __init__(self, echo_seconds: float = ECHO_SECONDS):
        self.echo_seconds = echo_seconds
        self.requested = False
        self.signal_name: Optional[str] = None
        self._first_at = 0.0
        self._previous: Dict[int, object] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def _handler(self, signum, frame) -> None:
        now = time.monotonic()
        if not self.requested:
            self.requested, self.signal_name, self._first_at = True, signal.Signals(signum).name, now
            return
        if now - self._first_at < self.echo_seconds:
            return  # the same request, forwarded twice
        try:
            os.write(2, f"second stop signal ({signal.Signals(signum).name}): exiting now, without saving; "
                        f"'latest' stays on the last complete checkpoint\n".encode())
        except OSError:
            pass
        os._exit(128 + signum)

    def install(self) -> None:
        """Take over SIGTERM and SIGINT (main thread only; a no-op when already installed, keeping a
        request that arrived earlier)."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return
        self.requested, self.signal_name = False, None
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, TypeError):
                pass
        self._previous.clear()


STOP_REQUEST = StopRequest()
"""The process's stop request (installed by `python -m loop_megatron.train` and by the trainer)."""
