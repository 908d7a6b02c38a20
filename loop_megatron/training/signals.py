"""Stopping a run cleanly: SIGTERM/SIGINT ask the loop to finish its step, save and return."""
from __future__ import annotations

import signal


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes the step, saves and returns. A second signal of
    the same kind gets the default behaviour back (kill)."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self._previous = {}

    def _handler(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, TypeError):
                pass
        self._previous.clear()
