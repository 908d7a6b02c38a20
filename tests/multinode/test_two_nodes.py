"""Two nodes for real: `launch/train.sh --hostfile` across two network namespaces (tests/multinode/cluster.py),
with DeepSpeed's pdsh launcher reaching both nodes over ssh, run inside node 0.

Cases: data parallelism, tensor parallelism and ZeRO-3 across the nodes, each with per-step losses equal to
the same job as a one-node 2-process run; the ssh-less mode (`--no-ssh --node-rank R`, one launcher per
node); every rank's report of its accelerator, threads and settings (computed on node 0, reaching node 1
through the job's .deepspeed_env); a SIGKILLed and a SIGSTOPped rank on node 1 ending the job on both
nodes within --distributed-timeout-minutes, with a sentence naming rank 1 and host node1; a resume
after the hang equal to the uninterrupted run; the loopback preflight warning.

Needs root, iproute2, openssh-server and pdsh (`.ci/run` installs the last two), and runs only when
LOOP_MEGATRON_MULTINODE=1 (`make test-multinode`): it takes a few minutes, so `make test` skips it.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster as two_nodes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_SH = os.path.join(ROOT, "launch", "train.sh")
ENABLED = os.environ.get("LOOP_MEGATRON_MULTINODE") == "1"

pytestmark = pytest.mark.skipif(not ENABLED, reason="the two-node test runs with LOOP_MEGATRON_MULTINODE=1 "
                                                    "(make test-multinode, as root)")

ITERS, MICRO, SEQ = 6, 2, 32
TIMEOUT_MINUTES = 0.4  # 24 s: the bound the kill and hang cases must end within (plus start/stop slack)
SLACK_S = 20


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    missing = two_nodes.missing_prerequisites()
    assert not missing, f"the two-node test needs {', '.join(missing)} (see .ci/run)"
    previous = signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    c = two_nodes.Cluster.create()
    try:
        yield c
    finally:
        c.close()
        signal.signal(signal.SIGTERM, previous)
        assert c.ns[0] not in two_nodes.sh("ip", "netns", "list")


@pytest.fixture(scope="module")
def work(nodes):
    """A folder for data, hostfile and runs (under the cluster's temporary folder: removed with it)."""
    from loop_megatron.data import IndexedDatasetBuilder
    from loop_megatron.data.indexed_dataset import bin_path, idx_path

    folder = os.path.join(nodes.tmp, "work")
    os.makedirs(folder)
    prefix = os.path.join(folder, "synth_text_document")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(bin_path(prefix), dtype=np.uint16)
    for doc in range(40):
        n = int(rng.integers(80, 200))
        builder.add_document((np.arange(n) * 7 + doc) % 250)
    builder.finalize(idx_path(prefix))
    with open(os.path.join(folder, "hostfile"), "w") as f:
        f.write("node0 slots=1\nnode1 slots=1\n")
    return folder


def trainer_args(work, name, *extra):
    return ["--preset", "tiny-1l", "--data-path", os.path.join(work, "synth_text_document"), "--split", "90,10,0",
            "--seq-length", str(SEQ), "--micro-batch-size", str(MICRO), "--train-iters", str(ITERS),
            "--lr-warmup-iters", "1", "--eval-interval", "100", "--eval-iters", "1", "--log-interval", "1",
            "--save-interval", "2", "--distributed-timeout-minutes", str(TIMEOUT_MINUTES),
            "--override", "model.vocab_size=256", "--override", "model.make_vocab_size_divisible_by=1",
            "--override", "model.hidden_size=32", "--override", "model.num_attention_heads=2",
            "--run-dir", os.path.join(work, name, "run"), "--save", os.path.join(work, name, "ckpt"), *extra]


def losses(work, name):
    with open(os.path.join(work, name, "run", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["iteration"]: r["loss"] for r in records if "loss" in r and "iteration" in r}


def tail(path, n=4000):
    with open(path) as f:
        return f.read()[-n:]


# One environment for the runs: one thread per rank (both nodes share this machine's cores), and the
# interface gloo must use (node1's hostname resolves to loopback there): both reach node 1 only through
# the job's .deepspeed_env.
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": two_nodes.IFNAME}


def launch(nodes, work, name, launcher_opts, *extra, env=ENV, node=0, timeout=300):
    log = os.path.join(work, f"{name}.log")
    status = nodes.run(node, ["bash", TRAIN_SH, *launcher_opts, "--", *trainer_args(work, name, *extra)], log,
                       env=env, cwd=work, timeout=timeout)
    assert status == 0, tail(log)
    return log


def one_node(nodes, work, name, *extra):
    """The reference: the same job as a one-node 2-process run (inside node 0, on its loopback)."""
    launch(nodes, work, name, ["--num-gpus", "2"], *extra, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    return losses(work, name)


@pytest.mark.parametrize("case,extra", [("dp", ()), ("tp", ("--tensor-model-parallel-size", "2")),
                                        ("zero3", ("--zero-stage", "3"))])
def test_across_two_nodes_equals_one_node(nodes, work, case, extra):
    """DP also checks the settings: nothing set by hand but GLOO_SOCKET_IFNAME, so OMP/MKL threads and
    DS_ACCELERATOR are what launch/train.sh computed on node 0 (cores / 1 slot), and each rank reports what
    it got."""
    reference = one_node(nodes, work, f"{case}-one-node", *extra)
    env = {"GLOO_SOCKET_IFNAME": two_nodes.IFNAME} if case == "dp" else ENV
    log = launch(nodes, work, f"{case}-two-nodes", ["--hostfile", os.path.join(work, "hostfile")], *extra, env=env)
    text = tail(log, 200000)
    assert "launch mode: ssh" in text and "on 2 rank(s)" in text
    assert sorted(reference) == list(range(1, ITERS + 1))
    assert losses(work, f"{case}-two-nodes") == reference  # bit-identical: the same sums, over another wire
    if case == "dp":
        check_rank_reports(text, threads=env.get("OMP_NUM_THREADS"))


def rank_reports(text):
    reports = {}
    for line in text.splitlines():
        if "rank " in line and "accelerator " in line and "torch threads" in line:
            body = line.split("rank ", 1)[1]
            reports[int(body.split("/", 1)[0])] = body
    return reports


def check_rank_reports(text, threads=None):
    """Both ranks, one per node, report accelerator cpu, torch threads = OMP_NUM_THREADS = MKL_NUM_THREADS =
    the launcher's share of the cores (or `threads`), and GLOO_SOCKET_IFNAME."""
    from loop_megatron.launch.environment import cpu_cores

    threads = threads or str(cpu_cores())
    reports = rank_reports(text)
    assert sorted(reports) == [0, 1], text[-3000:]
    for r, host in ((0, "node0"), (1, "node1")):
        report = reports[r]
        assert f"on host {host} " in report, report
        assert f"accelerator cpu, torch threads {threads}," in report, report
        for setting in ("DS_ACCELERATOR=cpu", f"OMP_NUM_THREADS={threads}", f"MKL_NUM_THREADS={threads}",
                        f"GLOO_SOCKET_IFNAME={two_nodes.IFNAME}"):
            assert setting in report, report
    assert not [f for f in os.listdir("/tmp") if f.startswith("loop_megatron_") and f.endswith(".deepspeed_env")], \
        "the job's .deepspeed_env was left behind"


def dp_reference(nodes, work):
    """Per-step losses of the DP job as a one-node run (from the DP case when it ran, else run now); the
    two-node DP run equals it (test_across_two_nodes_equals_one_node)."""
    if os.path.isfile(os.path.join(work, "dp-one-node", "run", "metrics.jsonl")):
        return losses(work, "dp-one-node")
    return one_node(nodes, work, "dp-one-node")


def test_no_ssh_one_launcher_per_node(nodes, work):
    reference = dp_reference(nodes, work)
    hostfile = os.path.join(work, "hostfile")
    common = ["--hostfile", hostfile, "--no-ssh", "--master-addr", two_nodes.ADDRESSES[0], "--master-port", "29533"]
    procs, logs = [], []
    for r in (1, 0):  # the same command on both nodes but for --node-rank (one filesystem here: see README)
        logs.append(os.path.join(work, f"no-ssh-{r}.log"))
        procs.append(nodes.popen(r, ["bash", TRAIN_SH, *common, "--node-rank", str(r), "--",
                                     *trainer_args(work, "no-ssh")], logs[-1], env=ENV, cwd=work))
    for proc, log in zip(procs, logs):
        try:
            assert proc.wait(timeout=300) == 0, tail(log)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert losses(work, "no-ssh") == reference


def _wait_for_iteration(work, name, iteration, proc, log, limit=240):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, tail(log)
        try:
            if max(losses(work, name), default=0) >= iteration:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{name} never reached iteration {iteration}: {tail(log)}")


def _stop_rank_and_time_the_end(nodes, work, name, sig):
    """Start the two-node job, send `sig` to rank 1 (node 1) after iteration 3, and return (seconds from the
    signal to the launcher's exit on node 0, the log)."""
    log = os.path.join(work, f"{name}.log")
    proc = nodes.popen(0, ["bash", TRAIN_SH, "--hostfile", os.path.join(work, "hostfile"), "--",
                           *trainer_args(work, name, "--debug-sleep-per-iter", "1")], log, env=ENV, cwd=work)
    try:
        _wait_for_iteration(work, name, 3, proc, log)
        victims = nodes.rank_pids(1)
        assert len(victims) == 1, victims
        os.kill(victims[0], sig)
        sent = time.monotonic()
        status = proc.wait(timeout=TIMEOUT_MINUTES * 60 + 120)
        ended = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status != 0, tail(log)
    # ... and on both nodes: no trainer rank, guard or per-node launcher is left behind.
    deadline = time.monotonic() + 10
    while (nodes.job_pids(0) or nodes.job_pids(1)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not nodes.job_pids(0) and not nodes.job_pids(1), (nodes.job_pids(0), nodes.job_pids(1))
    return ended, tail(log, 200000)


def _named(text):
    return [line for line in text.splitlines() if "error: rank 1 on host node1" in line
            or "error: " in line and "rank 1 on host node1" in line]


def test_killed_rank_ends_the_job_on_both_nodes(nodes, work):
    ended, text = _stop_rank_and_time_the_end(nodes, work, "kill", signal.SIGKILL)
    print(f"SIGKILL of rank 1: the job ended {ended:.1f} s later; said: {_named(text)}")
    assert ended < TIMEOUT_MINUTES * 60 + SLACK_S, text[-3000:]
    assert _named(text), text[-3000:]


def test_hung_rank_ends_the_job_within_the_timeout_and_resume_equals_uninterrupted(nodes, work):
    ended, text = _stop_rank_and_time_the_end(nodes, work, "hang", signal.SIGSTOP)
    print(f"SIGSTOP of rank 1: the job ended {ended:.1f} s later (timeout {TIMEOUT_MINUTES * 60:.0f} s); said: "
          f"{_named(text)}")
    assert ended < TIMEOUT_MINUTES * 60 + SLACK_S, text[-3000:]
    assert ended > TIMEOUT_MINUTES * 60 * 0.5, text[-3000:]  # it was the bound, not a crash, that ended it
    named = _named(text)
    assert named, text[-3000:]
    assert any("stopped responding" in line or "made no progress" in line for line in named), named
    # The resume (from the last checkpoint, iteration 2 or later) equals the uninterrupted run.
    reference = dp_reference(nodes, work)
    before = losses(work, "hang")
    launch(nodes, work, "hang", ["--hostfile", os.path.join(work, "hostfile")], "--load",
           os.path.join(work, "hang", "ckpt"))
    after = losses(work, "hang")
    assert max(before) >= 3 and sorted(after) == list(range(1, ITERS + 1))
    assert after == reference


def test_loopback_preflight_warns_with_the_fix(nodes, work):
    hostfile = os.path.join(work, "hostfile-loopback")
    with open(hostfile, "w") as f:
        f.write("node0-loopback slots=1\nnode1 slots=1\n")
    log = os.path.join(work, "preflight.log")
    status = nodes.run(0, ["bash", TRAIN_SH, "--dry-run", "--hostfile", hostfile, "--master-addr", "node0-loopback",
                           "--launcher-args", "--ssh_port 22", "--", *trainer_args(work, "preflight")], log,
                       env=ENV, cwd=work)
    text = tail(log)
    assert status == 0, text
    assert "warning: --master-addr node0-loopback resolves to 127.0.1.1 (loopback)" in text, text
    assert "warning: host node0-loopback of hostfile" in text and "/etc/hosts" in text, text
    assert "--ssh_port 22 --module loop_megatron.train" in text, text
    # node 1's hostname resolves to loopback in its hosts file: without GLOO_SOCKET_IFNAME its launcher says so
    status = nodes.run(1, ["bash", TRAIN_SH, "--dry-run", "--hostfile", os.path.join(work, "hostfile"), "--no-ssh",
                           "--node-rank", "1", "--master-addr", two_nodes.ADDRESSES[0], "--",
                           *trainer_args(work, "preflight")], log, env={"OMP_NUM_THREADS": "1"}, cwd=work)
    text = tail(log)
    assert status == 0 and "this node's hostname node1 resolves to 127.0.1.1" in text and \
        "GLOO_SOCKET_IFNAME" in text, text
