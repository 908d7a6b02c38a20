"""launch/train.sh end to end: a localhost hostfile with 2 slots, and two "nodes" on one machine (two
launcher invocations with --no-ssh --node-rank 0/1 --master-addr 127.0.0.1). Both train a tiny model on
tiny synthetic data with 2 gloo processes; the assertions are on the trainer's summary.json, metrics and
checkpoints, never on timing."""
import json
import os
import subprocess

import numpy as np
import pytest

from loop_megatron.utils.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_SH = os.path.join(ROOT, "launch", "train.sh")

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "loop_megatron", "train.py")),
                                reason="the trainer (loop_megatron/train.py) does not exist yet")

ITERS, MICRO, SEQ = 6, 2, 32


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    from loop_megatron.data import IndexedDatasetBuilder
    from loop_megatron.data.indexed_dataset import bin_path, idx_path

    prefix = str(tmp_path_factory.mktemp("data") / "synth_text_document")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(bin_path(prefix), dtype=np.uint16)
    for doc in range(40):
        n = int(rng.integers(80, 200))
        builder.add_document((np.arange(n) * 7 + doc) % 250)  # a learnable pattern over 250 token ids
    builder.finalize(idx_path(prefix))
    return prefix


def trainer_args(data_prefix, run_dir, save_dir):
    return ["--preset", "tiny-1l", "--data-path", data_prefix, "--split", "90,10,0", "--seq-length", str(SEQ),
            "--micro-batch-size", str(MICRO), "--train-iters", str(ITERS), "--lr-warmup-iters", "1",
            "--eval-interval", "3", "--eval-iters", "2", "--log-interval", "2",
            "--override", "model.vocab_size=256", "--override", "model.make_vocab_size_divisible_by=1",
            "--override", "model.hidden_size=32", "--override", "model.num_attention_heads=2",
            "--run-dir", run_dir, "--save", save_dir]


def env():
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
    e["MKL_NUM_THREADS"] = "1"
    return e


def check_finished_run(run_dir, save_dir, world_size):
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["iterations"] == ITERS
    # tokens = iterations x (micro batch x data-parallel ranks) x sequence: proves both ranks took part
    assert summary["tokens_seen"] == ITERS * MICRO * world_size * SEQ
    assert summary["num_layers"] == 1 and summary["final_valid_loss"] is not None
    assert np.isfinite(summary["final_train_loss"])
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run_dir, "tensorboard")))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["iteration"] for line in f if '"loss"' in line]
    assert steps == list(range(1, ITERS + 1))
    with open(os.path.join(save_dir, "latest")) as f:
        tag = f.read().strip()
    assert os.path.isfile(os.path.join(save_dir, tag, "meta.json"))


def test_train_sh_localhost_hostfile_two_processes(tmp_path, data_prefix):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one machine, two CPU processes\nlocalhost slots=2\n")
    run_dir, save_dir = str(tmp_path / "run"), str(tmp_path / "ckpt")
    proc = subprocess.run(["bash", TRAIN_SH, "--hostfile", str(hostfile), "--",
                           *trainer_args(data_prefix, run_dir, save_dir)],
                          cwd=str(tmp_path), env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "--no_ssh_check" in proc.stdout and "on 2 rank(s)" in proc.stdout
    check_finished_run(run_dir, save_dir, world_size=2)


def test_train_sh_two_nodes_on_loopback(tmp_path, data_prefix):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    run_dir, save_dir = str(tmp_path / "run"), str(tmp_path / "ckpt")
    port = str(free_port())
    procs = []
    for rank in (1, 0):
        cmd = ["bash", TRAIN_SH, "--hostfile", str(hostfile), "--no-ssh", "--node-rank", str(rank),
               "--master-addr", "127.0.0.1", "--master-port", port, "--",
               *trainer_args(data_prefix, run_dir, save_dir)]
        log = open(tmp_path / f"node{rank}.log", "w")
        procs.append((rank, subprocess.Popen(cmd, cwd=str(tmp_path), env=env(), stdout=log,
                                             stderr=subprocess.STDOUT), log))
    try:
        for rank, proc, log in procs:
            proc.wait(timeout=300)
    finally:
        for rank, proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = {rank: (tmp_path / f"node{rank}.log").read_text() for rank, _, _ in procs}
    for rank, proc, _ in procs:
        assert proc.returncode == 0, f"node {rank}:\n{logs[rank][-3000:]}"
    assert "--no_ssh --node_rank 0" in logs[0] and "--no_ssh --node_rank 1" in logs[1]
    assert "on 2 rank(s)" in logs[0]
    check_finished_run(run_dir, save_dir, world_size=2)


def test_train_sh_missing_hostfile_stops_before_starting(tmp_path):
    proc = subprocess.run(["bash", TRAIN_SH, "--hostfile", str(tmp_path / "absent"), "--preset", "tiny-1l"],
                          cwd=str(tmp_path), env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip() == (f"error: hostfile {tmp_path / 'absent'} does not exist; create it (see "
                                   f"launch/hostfile.example) or leave out --hostfile to run on this machine only.")
    assert proc.stdout == ""


def test_train_sh_ctrl_c_finishes_the_step_saves_and_exits_0(tmp_path, data_prefix):
    """Ctrl-C in a terminal signals the whole foreground process group (here: the group of a new
    session). launch/train.sh hands exactly one SIGINT to the ranks (DeepSpeed's launcher, in a group of
    its own, would add a SIGTERM and exit 1): they finish the step the signal landed in, save, log
    SIGINT, and the launch exits 0."""
    import re
    import signal

    run_dir, save_dir = str(tmp_path / "run"), str(tmp_path / "ckpt")
    args = trainer_args(data_prefix, run_dir, save_dir) + ["--train-iters", "20", "--log-interval", "1",
                                                           "--eval-interval", "0", "--debug-sleep-per-iter", "1.0"]
    proc = subprocess.Popen(["bash", TRAIN_SH, "--num-gpus", "2", "--", *args], cwd=str(tmp_path), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if re.match(r"iter\s+3/", line):
                os.killpg(proc.pid, signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = "".join(seen) + rest
    assert proc.returncode == 0, log[-4000:]
    assert "stop requested (SIGINT) at iteration 4; saving and exiting" in log, log[-4000:]
    with open(os.path.join(save_dir, "latest")) as f:
        assert f.read().strip() == "iter_0000004"


def test_train_sh_typo_stops_before_any_rank_with_one_line(tmp_path):
    proc = subprocess.run(["bash", TRAIN_SH, "--num-gpus", "2", "--preset", "tiny-1l", "--", "--hidden", "64"],
                          cwd=str(tmp_path), env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == "error: unknown flag --hidden; did you mean --hidden-size?\n"
    assert proc.stdout == ""
