"""A Megatron-LM command line runs as-is: the flag block of Megatron-LM's examples/gpt3/
train_gpt3_175b_distributed.sh, scaled to a tiny model on 2 CPU processes, under `torchrun ... -m
loop_megatron.train` (Megatron's launcher, with its DISTRIBUTED_ARGS) and under launch/train.sh (DeepSpeed's
launcher), and the second one resumes the first one's checkpoint with per-step losses and final weights equal
to the uninterrupted run's.

The run: torchrun trains 6 steps, saving at 3 and 6. Then a crash after the save at 3 is simulated (the tag of
step 6 is moved away and `latest` names iter_0000003), and launch/train.sh runs the same flag block, which
resumes at 3 (same layout: TP 2 x DP 1) and trains steps 4-6 again.

Scaled against the 175B script: sizes (2 layers, d=64, 4 heads, seq 64, micro 2, global 4, 6 steps, TP 2),
intervals, paths. Left out: --fp16 (DeepSpeed refuses fp16 on CPU; --bf16 is the CPU-able spelling, fp32 here
keeps the comparison tight), --step-batch-size-schedule (batch ramp-up is refused with its reason) and
--pipeline-model-parallel-size 16 (only 1 is accepted). The warm-up fraction is 0.2 of the 6 steps, where
the script's 0.001 of 430,000 would round to none.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from loop_megatron.data.tokenizer import default_vocab_files
from loop_megatron.utils.distributed import free_port
from tests.training.helpers import REPO, cli_env, write_corpus

ITERS = 6


def megatron_flag_block(data_prefix: str):
    """The example's flag groups, scaled (same flags, same order; see the module docstring)."""
    merge_file, vocab_file = default_vocab_files()  # Megatron's gpt2-merges.txt / gpt2-vocab.json
    gpt_model_args = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                      "--seq-length", "64", "--max-position-embeddings", "64", "--attention-backend", "auto"]
    training_args = ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(ITERS),
                     "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
                     "--init-method-std", "0.006", "--clip-grad", "1.0", "--lr", "6.0e-4", "--min-lr", "6.0e-5",
                     "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.2", "--lr-decay-iters", str(ITERS)]
    model_parallel_args = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "1"]
    data_args = ["--data-path", data_prefix, "--vocab-file", vocab_file, "--merge-file", merge_file,
                 "--split", "949,50,1"]
    eval_and_logging_args = ["--log-interval", "1", "--save-interval", "3", "--eval-interval", "3",
                             "--save", "ckpt", "--load", "ckpt", "--eval-iters", "1", "--tensorboard-dir", "tb"]
    return gpt_model_args + training_args + model_parallel_args + data_args + eval_and_logging_args


def _env():
    env = cli_env()
    env["PYTHON"] = sys.executable  # launch/_python.sh: the interpreter running the tests
    env["MKL_NUM_THREADS"] = "1"
    return env


def _torchrun():
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "torch.distributed.run"]


def _losses(metrics_path, skip=0):
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f.read().splitlines()[skip:]]
    return {r["iteration"]: r["loss"] for r in records if "loss" in r}, sum(1 for _ in records) + skip


def test_megatron_flag_block_under_torchrun_and_launch_sh_resumes(tmp_path):
    prefix = write_corpus(str(tmp_path / "data"))
    work = tmp_path / "work"
    work.mkdir()
    block = megatron_flag_block(prefix)
    distributed_args = ["--nproc_per_node", "2", "--nnodes", "1", "--master_addr", "127.0.0.1",
                        "--master_port", str(free_port())]
    first = subprocess.run(_torchrun() + distributed_args + ["-m", "loop_megatron.train"] + block, cwd=work,
                           env=_env(), capture_output=True, text=True, timeout=400)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "TP 2 x DP 1" in first.stdout and "starting from scratch" in first.stdout
    metrics = os.path.join(work, "runs", "custom", "metrics.jsonl")
    uninterrupted, lines = _losses(metrics)
    assert sorted(uninterrupted) == list(range(1, ITERS + 1))

    ckpt = os.path.join(work, "ckpt")
    shutil.move(os.path.join(ckpt, "iter_0000006"), str(tmp_path / "iter_0000006"))  # "crash" after step 3's save
    with open(os.path.join(ckpt, "latest"), "w") as f:
        f.write("iter_0000003")
    second = subprocess.run([os.path.join(REPO, "launch", "train.sh"), "--nproc-per-node", "2"] + block, cwd=work,
                            env=_env(), capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from ckpt/iter_0000003 at iteration 3" in second.stdout, second.stdout[-3000:]
    resumed, _ = _losses(metrics, skip=lines)
    assert sorted(resumed) == [4, 5, 6]
    for it in (4, 5, 6):
        assert resumed[it] == pytest.approx(uninterrupted[it], rel=1e-5), it
    a = torch.load(str(tmp_path / "iter_0000006" / "model.pt"), map_location="cpu", weights_only=True)
    b = torch.load(os.path.join(ckpt, "iter_0000006", "model.pt"), map_location="cpu", weights_only=True)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("flags,message", [
    (["--context-parallel-size", "2"], "error: --context-parallel-size (Megatron-LM) is not supported here: "
                                       "context parallelism is not implemented"),
    (["--pipeline-model-parallel-size", "16"], "error: --pipeline-model-parallel-size 16: this trainer has no "
                                               "pipeline parallelism"),
])
def test_launch_sh_refuses_unsupported_megatron_flags_before_any_rank(tmp_path, flags, message):
    proc = subprocess.run([os.path.join(REPO, "launch", "train.sh"), "--nproc-per-node", "2", "--preset", "tiny-1l"]
                          + flags, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(message) and len(proc.stderr.splitlines()) == 1, proc.stderr
