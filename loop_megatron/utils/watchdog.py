"""A job that ends on every node, within --distributed-timeout-minutes, when one rank dies or hangs.

Process groups with a timeout (training/distributed.py, parallel/state.py) end the collectives of the
ranks that are still alive; two things they cannot do, and this module does:

* say who stopped. Every rank heart-beats into the job's key-value store (a TCPStore client of its own
  on MASTER_ADDR:MASTER_PORT, the rendezvous store, so a busy main thread never delays it), and rank r
  watches rank r+1 (a ring: one read per rank and beat, at any scale). A rank whose heartbeat has not
  changed for the timeout ends the job: its watcher prints one sentence naming the rank and host and exits.
  When a collective fails first (a SIGKILLed peer resets its connections within seconds), `explain()`
  reads every rank's heartbeat twice, two beats apart, and names the one that stopped.
* end a rank that is itself stopped (SIGSTOP) or stuck holding the interpreter: it cannot act, and
  DeepSpeed's per-node launcher would wait on it forever (and with it pdsh and the whole job). Each rank
  therefore starts a guard process (this file run as a script, standard library only) fed a byte per beat
  through a pipe by a thread that does nothing else; when no byte has come for the timeout, the guard
  prints one sentence naming its rank and host and SIGKILLs it. The guard exits when the pipe closes
  (the rank ended, however it ended).

A rank that finishes marks its heartbeat `done`, and a rank that is ending because of a failure marks it
`ending`, so neither is blamed. The store client is passed in (anything with torch's Store methods
set/get/check/add), so this module imports no torch.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

PREFIX = "loop_megatron/watchdog/"
DONE, ENDING, FAILED = "done", "ending", "failed"
ENDED = (DONE, ENDING, FAILED)


def beat_interval(timeout_s: float) -> float:
    """Seconds between heartbeats: a tenth of the timeout, between 0.2 s and 5 s."""
    return min(5.0, max(0.2, timeout_s / 10.0))


def minutes_text(timeout_s: float) -> str:
    return f"{timeout_s / 60:g}"


class RankWatchdog:
    """This rank's heartbeat, its watch over the next rank, and its guard process (see the module doc).

    `store`: a store client of this rank alone; `exit_fn` ends the rank after a report (os._exit; tests
    pass their own). `start()` after the process group exists, `stop()` when the run ends cleanly.
    """

    def __init__(self, store, rank: int, world_size: int, timeout_s: float, host: Optional[str] = None,
                 interval_s: Optional[float] = None, exit_fn: Callable[[int], None] = os._exit,
                 guard: bool = True, out=None):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout_s = timeout_s
        self.interval_s = interval_s or beat_interval(timeout_s)
        self.host = host or socket.gethostname()
        self.exit_fn, self.use_guard, self.out = exit_fn, guard, out
        self.hosts: Dict[int, str] = {}
        self.reported = False
        self._count = 0
        self._state: Optional[str] = None  # None (beating), DONE or ENDING
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: List[threading.Thread] = []
        self._guard: Optional[subprocess.Popen] = None

    # -- keys --------------------------------------------------------------------------------------
    @staticmethod
    def _beat_key(r: int) -> str:
        return f"{PREFIX}beat/{r}"

    @staticmethod
    def _host_key(r: int) -> str:
        return f"{PREFIX}host/{r}"

    def host_of(self, r: int) -> str:
        return self.hosts.get(r, "?")

    # -- life cycle ----------------------------------------------------------------------------------
    def start(self) -> "RankWatchdog":
        self.store.set(self._host_key(self.rank), self.host)
        self.store.set(self._beat_key(self.rank), "0")
        self.hosts[self.rank] = self.host
        if self.use_guard:
            self._guard = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--pid", str(os.getpid()), "--rank", str(self.rank),
                 "--host", self.host, "--timeout", str(self.timeout_s)], stdin=subprocess.PIPE, close_fds=True)
            self._threads.append(threading.Thread(target=self._feed_guard, name="watchdog-guard", daemon=True))
        if self.world_size > 1:
            self._threads.append(threading.Thread(target=self._beat_and_watch, name="watchdog", daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, state: str = DONE) -> None:
        """Mark this rank `done` (others stop watching it), end the threads and the guard."""
        self._set_state(state)
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2 * self.interval_s + 1)
        if self._guard is not None:
            try:
                self._guard.stdin.close()
            except OSError:
                pass
            try:
                self._guard.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._guard.kill()
            self._guard = None

    def _set_state(self, state: str) -> None:
        with self._lock:
            if self._state is None:
                self._state = state
                try:
                    self.store.set(self._beat_key(self.rank), state)
                except Exception:
                    pass

    # -- threads -------------------------------------------------------------------------------------
    def _feed_guard(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._guard.stdin.write(b".")
                self._guard.stdin.flush()
            except (OSError, ValueError):
                return

    def _beat_and_watch(self) -> None:
        watched = (self.rank + 1) % self.world_size
        last_value, last_change = None, time.monotonic()
        store_failing_since: Optional[float] = None
        rank0: Optional[str] = None
        while not self._stop.wait(self.interval_s):
            attempt = time.monotonic()
            try:
                if len(self.hosts) < self.world_size:  # everyone's host name, once all have registered
                    keys = [self._host_key(r) for r in range(self.world_size)]
                    if self.store.check(keys):
                        self.hosts = {r: self.store.get(k).decode() for r, k in enumerate(keys)}
                with self._lock:
                    if self._state is None:
                        self._count += 1
                        self.store.set(self._beat_key(self.rank), str(self._count))
                key = self._beat_key(watched)
                value = self.store.get(key).decode() if self.store.check([key]) else None
                key0 = self._beat_key(0)  # rank 0 serves the store: its end is the store's end
                rank0 = value if watched == 0 else (self.store.get(key0).decode() if self.store.check([key0]) else None)
                store_failing_since = None
            except Exception:
                now = time.monotonic()
                if rank0 in ENDED:
                    return  # rank 0 has finished (or is failing, which the collectives report): not a stop
                store_failing_since = store_failing_since or attempt
                if now - store_failing_since >= min(self.timeout_s, 3 * self.interval_s) and self._state is None:
                    self.report(f"rank 0 on host {self.host_of(0)} stopped: the job's store on it has not answered "
                                f"for {now - store_failing_since:.0f} s; ending rank {self.rank} on host {self.host}.",
                                culprits=[0])
                    self.exit_fn(1)
                    return
                continue
            now = time.monotonic()
            if value in ENDED:
                last_value, last_change = value, now
                continue
            if value != last_value:
                last_value, last_change = value, now
            elif now - last_change >= self.timeout_s and self._state is None:
                self.report(f"rank {watched} on host {self.host_of(watched)} stopped responding: no heartbeat for "
                            f"{now - last_change:.0f} s (--distributed-timeout-minutes {minutes_text(self.timeout_s)}); "
                            f"ending the job.", culprits=[watched])
                self.exit_fn(1)
                return

    # -- failures ------------------------------------------------------------------------------------
    def report(self, sentence: str, culprits: List[int]) -> None:
        """Print `sentence` once for the whole job: the first rank to claim it in the store, or (the store
        gone with rank 0) the lowest rank that is not a culprit. Marks this rank `ending`."""
        self._set_state(ENDING)
        if self.reported:
            return
        self.reported = True
        try:
            first = int(self.store.add(f"{PREFIX}reported", 1)) == 1
        except Exception:
            first = self.rank == min(r for r in range(self.world_size) if r not in culprits)
        if first:
            print(f"error: {sentence}", file=self.out or sys.stderr, flush=True)

    def explain(self) -> Optional[str]:
        """After an error on this rank: the sentence naming the rank(s) whose heartbeat stopped (read
        twice, two beats apart) or that failed first, reported once for the job; None when every other rank
        still beats (the failure was this rank's own: it is marked `failed`, which its peers then name)."""
        if self.world_size == 1:
            return None

        def read() -> Optional[Dict[int, str]]:
            try:
                keys = [self._beat_key(r) for r in range(self.world_size)]
                return {r: v.decode() for r, v in enumerate(self.store.multi_get(keys))}
            except Exception:
                return None

        first = read()
        time.sleep(2.5 * self.interval_s)
        second = read()
        if first is None or second is None:
            culprits = [0]
            sentence = (f"rank 0 on host {self.host_of(0)} stopped (the job's store on it no longer answers); "
                        f"ending rank {self.rank} on host {self.host}.")
        else:
            others = [r for r in range(self.world_size) if r != self.rank]
            culprits = [r for r in others if second[r] not in ENDED and first[r] == second[r]]
            how = "stopped (no heartbeat since a collective failed)"
            if not culprits:
                culprits = [r for r in others if second[r] == FAILED]
                how = "failed (its own error is printed above)"
            if not culprits:
                self._set_state(FAILED)
                return None
            who = ", ".join(f"rank {r} on host {self.host_of(r)}" for r in culprits)
            sentence = f"{who} {how}; ending the job."
        self.report(sentence, culprits)
        return sentence


# -- the guard process ---------------------------------------------------------------------------------
def guard_main(argv: Optional[List[str]] = None) -> int:
    """Watch the rank `--pid` through stdin (a byte per beat); SIGKILL it after `--timeout` s of silence."""
    import argparse

    p = argparse.ArgumentParser(description="the rank guard of loop_megatron.utils.watchdog")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--timeout", type=float, required=True)
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the rank's to handle
    fd = sys.stdin.fileno()
    last = time.monotonic()
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.05, args.timeout - (time.monotonic() - last)))
        if ready:
            if not os.read(fd, 4096):
                return 0  # the rank closed the pipe or ended
            last = time.monotonic()
        elif time.monotonic() - last >= args.timeout:
            if os.getppid() != args.pid:
                return 0
            print(f"error: rank {args.rank} on host {args.host} (pid {args.pid}) made no progress for "
                  f"{time.monotonic() - last:.0f} s (stopped or hung; --distributed-timeout-minutes "
                  f"{minutes_text(args.timeout)}); killing it so that its node's launcher can end.",
                  file=sys.stderr, flush=True)
            try:
                os.kill(args.pid, signal.SIGKILL)
            except OSError:
                pass
            return 1


if __name__ == "__main__":
    sys.exit(guard_main())
