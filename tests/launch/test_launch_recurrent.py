"""launch/train.sh runs the CPU recurrent-depth preset (linear injection, random s0, sampled depth,
truncated backprop) on 2 processes with TP=2, ZeRO-3 and per-iteration activation checkpointing, and
logs the depth each step ran."""
import json
import os
import subprocess

from loop_megatron.config import preset, set_field
from loop_megatron.training.loop_depth import LoopDepthSampler
from tests.launch.test_launch import TRAIN_SH, data_prefix, env  # noqa: F401  (data_prefix: a fixture)

ITERS = 3


def test_train_sh_tiny_recurrent_tp2_zero3_per_iteration(tmp_path, data_prefix):  # noqa: F811
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run_dir = str(tmp_path / "run")
    proc = subprocess.run(["bash", TRAIN_SH, "--hostfile", str(hostfile), "--preset", "tiny-recurrent", "--",
                           "--data-path", data_prefix, "--split", "90,10,0", "--tensor-model-parallel-size", "2",
                           "--zero-stage", "3", "--activation-checkpointing", "per-iteration",
                           "--train-iters", str(ITERS), "--eval-iters", "1", "--log-interval", "1",
                           "--run-dir", run_dir],
                          cwd=str(tmp_path), env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TP 2 x DP 1" in proc.stdout and "ZeRO 3" in proc.stdout
    with open(os.path.join(run_dir, "summary.json")) as f:
        assert json.load(f)["iterations"] == ITERS
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        loops = [json.loads(line)["loops"] for line in f if '"loss"' in line]
    cfg = preset("tiny-recurrent")
    set_field(cfg, "training.train_iters", ITERS, "test")
    sampler = LoopDepthSampler(cfg)  # its draws are checked against a written-out reference elsewhere
    assert loops == [float(sampler.step_loops(it, 0)) for it in range(ITERS)]
    assert "| loops " in proc.stdout
