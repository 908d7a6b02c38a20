"""Shared pieces of the training tests: a small synthetic corpus and a tiny fp32 config."""
from __future__ import annotations

import os
import sys
from typing import Any, Dict

import numpy as np

from loop_megatron.config import Config, preset, set_field
from loop_megatron.data.indexed_dataset import IndexedDatasetBuilder

VOCAB = 256
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_corpus(directory: str, name: str = "syn_text_document", documents: int = 240, seed: int = 0) -> str:
    """A Megatron .bin/.idx pair of learnable token patterns (arithmetic runs mod 250); returns the prefix."""
    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, name)
    if os.path.exists(prefix + ".idx"):
        return prefix
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(documents):
        n = int(rng.integers(20, 90))
        start, step = int(rng.integers(0, 250)), int(rng.integers(1, 5))
        builder.add_document([(start + step * k) % 250 for k in range(n)] + [VOCAB - 1])
    builder.finalize(prefix + ".idx")
    return prefix


def tiny_config(prefix: str, run_dir: str, **overrides: Any) -> Config:
    """hidden 32, 2 layers x 2 loops (vector gates), vocab 256, seq 16, fp32, few steps."""
    cfg = preset("tiny-2l-2loop")
    values: Dict[str, Any] = {
        "model.hidden_size": 32, "model.num_attention_heads": 4, "model.vocab_size": VOCAB,
        "model.make_vocab_size_divisible_by": 1, "model.max_position_embeddings": 32,
        "data.data_path": [prefix], "data.seq_length": 16, "data.split": "90,10,0",
        "data.data_cache_path": os.path.join(run_dir, "index_cache"),
        "training.micro_batch_size": 2, "training.train_iters": 4, "training.lr": 3e-3, "training.min_lr": 3e-4,
        "training.lr_warmup_iters": 1, "training.log_interval": 100, "training.eval_interval": 0,
        "training.eval_iters": 2, "training.precision": "fp32", "training.run_dir": run_dir,
        "training.seed": 7, "training.save": "",  # the preset's recipe saves to checkpoints/<name>; tests opt in
    }
    values.update(overrides)
    for key, value in values.items():
        set_field(cfg, key, value, "test")
    return cfg


def cli_env() -> Dict[str, str]:
    """Environment for running the CLI as a subprocess from the repo root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


PYTHON = sys.executable


def train_tiny_cli(prefix: str, tmp_path, *flags: str):
    """Run `python -m loop_megatron.train` for 3 steps of a 1-layer d=32 model on `prefix` (split 70,30,0,
    fp32, seq 16, eval 2 micro-batches), run folder tmp_path/run, checkpoints tmp_path/ck, index cache
    tmp_path/cache, plus `flags`; assert it exits 0 and return the completed process."""
    import subprocess

    cmd = [PYTHON, "-m", "loop_megatron.train", "--preset", "tiny-2l-2loop", "--data-path", prefix, *flags,
           "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
           "--micro-batch-size", "2", "--train-iters", "3", "--eval-iters", "2", "--precision", "fp32",
           "--split", "70,30,0", "--run-dir", str(tmp_path / "run"), "--save", str(tmp_path / "ck"),
           "--override", "model.max_position_embeddings=32", "--override", f"data.data_cache_path={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def evaluate_tiny_run(prefix: str, tmp_path):
    """The checkpoint of `train_tiny_cli` evaluated on the run's own settings (`evaluate_checkpoint`, 2
    micro-batches), asserted to equal the run's last valid loss; returns (that result, the valid split's
    dataset exactly as the run served it)."""
    import json

    import pytest

    from loop_megatron.data import build_train_valid_test_datasets
    from loop_megatron.inference.evaluation import evaluate_checkpoint

    summary = json.load(open(tmp_path / "run" / "summary.json"))
    results, meta = evaluate_checkpoint(str(tmp_path / "ck"), eval_iters=2)
    assert results[0].loss == pytest.approx(summary["final_valid_loss"], rel=1e-5)
    valid = build_train_valid_test_datasets([prefix], "70,30,0", 16, meta["eval_data"]["seed"], (0, None, 0),
                                            str(tmp_path / "cache"))[1]
    return results[0], valid


def pretrain_in_process(cfg: Config, opts=None):
    """pretrain() in this process (a world of one), leaving no process group behind for the next test."""
    import torch.distributed as dist

    from loop_megatron.training import RunOptions, pretrain

    try:
        return pretrain(cfg, opts or RunOptions())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
