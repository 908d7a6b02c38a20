"""The rank watchdog (loop_megatron/utils/watchdog.py) on an in-memory store: a rank whose heartbeat stops is
named (rank and host) within the timeout, a rank that finished or failed on its own is not blamed, the
store going away names rank 0, and the guard process SIGKILLs a SIGSTOPped rank. The two-node version
(real processes, ssh, both nodes) is tests/multinode/test_two_nodes.py."""
import io
import os
import signal
import subprocess
import sys
import threading
import time

from loop_megatron.utils.watchdog import FAILED, RankWatchdog

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT, BEAT = 1.5, 0.1  # generous: the timing bounds must hold on a loaded 2-core machine


class DictStore:
    """The torch Store methods the watchdog uses, in memory; `broken` makes every call fail."""

    def __init__(self):
        self.data, self.lock, self.broken = {}, threading.Lock(), False

    def _ok(self):
        if self.broken:
            raise RuntimeError("Connection reset by peer")

    def set(self, key, value):
        self._ok()
        with self.lock:
            self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key):
        self._ok()
        with self.lock:
            return self.data[key]

    def check(self, keys):
        self._ok()
        with self.lock:
            return all(k in self.data for k in keys)

    def multi_get(self, keys):
        return [self.get(k) for k in keys]

    def add(self, key, amount):
        self._ok()
        with self.lock:
            value = int(self.data.get(key, b"0")) + amount
            self.data[key] = str(value).encode()
            return value


def pair(store):
    exits, outs = [], [io.StringIO(), io.StringIO()]
    dogs = [RankWatchdog(store, r, 2, TIMEOUT, host=f"h{r}", interval_s=BEAT, guard=False, out=outs[r],
                         exit_fn=lambda code, r=r: exits.append((r, code, time.monotonic()))) for r in (0, 1)]
    for dog in dogs:
        dog.start()
    return dogs, exits, outs


def freeze(dog):
    """What a SIGKILL or SIGSTOP does to a rank's heartbeat: it stops, with no last word."""
    dog._stop.set()
    for thread in dog._threads:
        thread.join()


def test_a_rank_whose_heartbeat_stops_is_named_within_the_timeout():
    store = DictStore()
    (d0, d1), exits, outs = pair(store)
    time.sleep(4 * BEAT)
    freeze(d1)
    stopped = time.monotonic()
    while not exits and time.monotonic() - stopped < 5 * TIMEOUT:
        time.sleep(BEAT / 2)
    d0.stop()
    assert exits and exits[0][:2] == (0, 1)
    assert TIMEOUT * 0.8 <= exits[0][2] - stopped <= TIMEOUT + 10 * BEAT + 1
    text = outs[0].getvalue()
    assert text.startswith("error: rank 1 on host h1 stopped responding: no heartbeat for") and text.count("\n") == 1


def test_a_finished_rank_is_not_blamed():
    store = DictStore()
    (d0, d1), exits, _ = pair(store)
    time.sleep(3 * BEAT)
    d1.stop()  # done: rank 0 is still saving, say
    time.sleep(TIMEOUT + 4 * BEAT)
    d0.stop()
    assert exits == []


def test_explain_names_the_rank_that_stopped_after_a_collective_failed():
    store = DictStore()
    (d0, d1), exits, outs = pair(store)
    time.sleep(3 * BEAT)
    freeze(d1)
    sentence = d0.explain()
    d0.stop()
    assert sentence == "rank 1 on host h1 stopped (no heartbeat since a collective failed); ending the job."
    assert outs[0].getvalue() == f"error: {sentence}\n" and exits == []


def test_a_rank_that_failed_on_its_own_is_named_by_its_peer_and_not_by_itself():
    store = DictStore()
    (d0, d1), exits, outs = pair(store)
    time.sleep(3 * BEAT)
    assert d1.explain() is None  # rank 0 still beats: rank 1's error is its own
    assert store.get("loop_megatron/watchdog/beat/1").decode() == FAILED
    assert d0.explain() == "rank 1 on host h1 failed (its own error is printed above); ending the job."
    d0.stop()
    d1.stop()
    assert outs[1].getvalue() == "" and outs[0].getvalue().startswith("error: rank 1 on host h1 failed")


def test_the_store_going_away_names_rank_0():
    store = DictStore()
    (d0, d1), exits, outs = pair(store)
    time.sleep(3 * BEAT)
    freeze(d0)
    store.broken = True  # rank 0 served the store
    deadline = time.monotonic() + 5 * TIMEOUT
    while not exits and time.monotonic() < deadline:
        time.sleep(BEAT / 2)
    d1.stop()
    assert exits and exits[0][:2] == (1, 1)
    assert outs[1].getvalue().startswith("error: rank 0 on host h0 stopped: the job's store on it has not answered")


CHILD = f"""
import sys, time
sys.path.insert(0, {ROOT!r})
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from test_watchdog import DictStore
from loop_megatron.utils.watchdog import RankWatchdog
dog = RankWatchdog(DictStore(), 3, 1, float(sys.argv[1]), host="hostX", interval_s=0.05).start()
print(dog._guard.pid, flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_the_guard_kills_a_stopped_rank_and_names_it():
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "1.0", "60"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    guard = int(proc.stdout.readline())
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        status = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    ended = time.monotonic() - stopped
    assert status == -signal.SIGKILL and 0.9 <= ended <= 6.0, ended
    err = proc.stderr.read()
    assert f"error: rank 3 on host hostX (pid {proc.pid}) made no progress for 1 s (stopped or hung" in err, err
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{guard}") or open(f"/proc/{guard}/stat").read().split()[2] == "Z"


def test_the_guard_leaves_with_its_rank():
    proc = subprocess.run([sys.executable, "-c", CHILD, "30", "0.3"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    guard = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{guard}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{guard}")


def test_rank_0_finishing_takes_the_store_along_without_blame():
    store = DictStore()
    (d0, d1), exits, outs = pair(store)
    time.sleep(3 * BEAT)
    d0.stop()  # done, then its process (and the store it serves) ends while rank 1 is still closing
    time.sleep(3 * BEAT)
    store.broken = True
    time.sleep(TIMEOUT + 4 * BEAT)
    d1.stop()
    assert exits == [] and outs[1].getvalue() == ""
