"""The stop request: the first SIGINT/SIGTERM is recorded under its own name (an echo of it that a
launcher forwards right after does not rename it), a later one exits at once with 128 + its number."""
import os
import signal
import subprocess
import sys
import time

from loop_megatron.utils.signals import StopRequest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_first_signal_is_the_one_named_and_an_echo_is_ignored():
    stop, before = StopRequest(echo_seconds=60.0), signal.getsignal(signal.SIGINT)
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the terminal ...
        os.kill(os.getpid(), signal.SIGTERM)  # ... and DeepSpeed's launcher forwarding a SIGTERM on top
        time.sleep(0.01)  # the handlers run between bytecodes
        assert stop.requested and stop.signal_name == "SIGINT"
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is before


def test_second_signal_exits_at_once_with_its_status():
    code = ("import os, signal, time\n"
            "from loop_megatron.utils.signals import StopRequest\n"
            "stop = StopRequest(echo_seconds=0.0)\n"
            "stop.install()\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(0.05)\n"
            "print('first:', stop.signal_name, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(10)\n"
            "print('still running')\n")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stdout + proc.stderr
    assert proc.stdout == "first: SIGINT\n"
    assert "second stop signal (SIGTERM): exiting now" in proc.stderr
