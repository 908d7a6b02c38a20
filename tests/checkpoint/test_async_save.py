"""Checkpoint size and asynchronous saves (one process, CPU).

- A checkpoint holds one copy of the state: universal/ (fp32 masters + AdamW moments) and model.pt in
  the training dtype, no DeepSpeed shards; tools/checkpoint_info.py reports its bytes per parameter.
- A checkpoint in the layout written before (DeepSpeed's shards beside universal/) still resumes,
  through DeepSpeed's shards, bit-exact.
- --async-save: a run killed with SIGKILL during a background write leaves the folder under its
  temporary name and `latest` on the previous checkpoint; a resumed run continues from that one and
  prunes the leftover.
"""
import json
import os
import signal
import subprocess
import time

import pytest

from tests.training.helpers import PYTHON, REPO, cli_env, tiny_config, write_corpus

BASE = {"training.global_batch_size": 4, "training.lr_warmup_iters": 1, "training.lr_decay_iters": 4,
        "training.eval_iters": 0, "training.zero_stage": 1}


def _losses(result):
    return {rec["iteration"]: rec["loss"] for rec in result["records"]}


def test_one_copy_old_layout_resumes_and_async_matches_blocking(tmp_path, monkeypatch):
    from loop_megatron import checkpoint
    from loop_megatron.checkpoint import engine
    from loop_megatron.checkpoint.info import describe, format_text
    from loop_megatron.training import RunOptions, pretrain, preflight

    prefix = write_corpus(str(tmp_path / "data"))

    def cfg(name, **extra):
        return tiny_config(prefix, str(tmp_path / name), **BASE, **extra)

    full = pretrain(cfg("full", **{"training.train_iters": 4, "training.save": str(tmp_path / "full_ck")}),
                    RunOptions(), return_state_dict=True)
    # The new layout: universal/ + model.pt (fp32 run: 4 bytes) + RNG + meta, no DeepSpeed shards.
    info = describe(str(tmp_path / "full_ck"))
    size = info["size"]
    assert not info["engine_state"] and info["universal"]["complete"] and info["complete"]
    assert size["bytes"]["deepspeed"] == 0 and size["minimal_bytes_per_param"] == 16
    # 12 bytes per parameter in universal/, 4 in model.pt, plus torch.save's container (zip records and the
    # pickle: under 4 KiB a file); at this size (~30K parameters) that overhead is still visible, at 6.9M not.
    params, files = size["params"], len(os.listdir(tmp_path / "full_ck" / "iter_0000004" / "universal" / "params"))
    assert 0 < size["bytes"]["universal"] - 12 * params < 4096 * (files + 1)
    assert 0 < size["bytes"]["model.pt"] - 4 * params < 4096 * files
    assert "bytes/parameter" in format_text(info) and "same_layout" in info["resume"]

    # The layout written before (DeepSpeed's shards + universal/ + fp32 model.pt) resumes through the shards.
    old = str(tmp_path / "old_ck")
    monkeypatch.setattr(engine, "DEEPSPEED_SHARDS", True)
    pretrain(cfg("old", **{"training.train_iters": 2, "training.save": old}), RunOptions())
    monkeypatch.setattr(engine, "DEEPSPEED_SHARDS", None)
    assert checkpoint.layout.has_engine_files(os.path.join(old, "iter_0000002"))
    resumed_cfg = cfg("resumed_old", **{"training.train_iters": 4, "training.load": old, "training.save": old})
    assert preflight(resumed_cfg, RunOptions())["resume"].mode == "engine"
    resumed = pretrain(resumed_cfg, RunOptions(), return_state_dict=True)
    assert resumed["start_iteration"] == 2
    assert {i: l for i, l in _losses(full).items() if i > 2} == _losses(resumed)  # bit-exact
    # Its save is in the new layout and resumes too (through universal/ on the same layout).
    assert not checkpoint.layout.has_engine_files(os.path.join(old, "iter_0000004"))

    # --async-save writes the same checkpoint as a blocking save (same bytes of every tensor).
    import torch

    asy = pretrain(cfg("async", **{"training.train_iters": 4, "training.save": str(tmp_path / "async_ck"),
                                   "training.save_interval": 2, "training.async_save": True}), RunOptions())
    assert _losses(asy) == _losses(full)
    assert checkpoint.read_latest(str(tmp_path / "async_ck")) == "iter_0000004"
    for rel in ["model.pt"] + [os.path.join("universal", "params", n) for n in
                               os.listdir(str(tmp_path / "full_ck" / "iter_0000004" / "universal" / "params"))]:
        a = torch.load(str(tmp_path / "async_ck" / "iter_0000004" / rel), weights_only=True)
        b = torch.load(str(tmp_path / "full_ck" / "iter_0000004" / rel), weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel


def _cli(prefix, tmp_path, ck, *extra):
    return [PYTHON, "-m", "loop_megatron.train", "--preset", "tiny-2l-2loop", "--data-path", prefix,
            "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "4", "--eval-iters", "0", "--precision", "fp32",
            "--split", "90,10,0", "--log-interval", "1", "--lr-warmup-iters", "1", "--lr-decay-iters", "4",
            "--run-dir", str(tmp_path / "run"), "--save", ck, "--load", ck, "--save-interval", "2", "--async-save",
            "--override", "model.vocab_size=256", "--override", "model.make_vocab_size_divisible_by=1",
            "--override", "model.max_position_embeddings=32", "--override", f"data.data_cache_path={tmp_path / 'c'}",
            *extra]


def test_sigkill_during_a_background_write_leaves_no_complete_looking_checkpoint(tmp_path):
    from loop_megatron import checkpoint

    prefix = write_corpus(str(tmp_path / "data"))
    ck = str(tmp_path / "ck")
    # Each file of a background write waits 0.3 s: the write of iteration 4 (~20 files) is still going
    # when its snapshot is logged, and the run waits for it at the end, so it is killed in the middle.
    proc = subprocess.Popen(_cli(prefix, tmp_path, ck, "--debug-slow-save", "0.3"), cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 240
    try:
        for line in proc.stdout:
            lines.append(line)
            if "iter_0000004: snapshot taken" in line:
                time.sleep(1.0)  # some files of iteration 4 are written by now
                proc.send_signal(signal.SIGKILL)
                break
            assert time.time() < deadline, "".join(lines[-30:])
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines[-30:])
    names = sorted(os.listdir(ck))
    assert "iter_0000004.tmp" in names and "iter_0000004" not in names, names
    assert os.listdir(os.path.join(ck, "iter_0000004.tmp"))  # the write was under way
    assert checkpoint.read_latest(ck) == "iter_0000002"
    assert checkpoint.list_tags(ck) == ["iter_0000002"]
    assert checkpoint.resolve_checkpoint(ck) == os.path.join(ck, "iter_0000002")

    # Resuming (same command, no slow writer) continues from iteration 2 and prunes the leftover folder.
    again = subprocess.run(_cli(prefix, tmp_path, ck), cwd=REPO, env=cli_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {os.path.join(ck, 'iter_0000002')} at iteration 2" in again.stdout
    assert sorted(n for n in os.listdir(ck) if not n.startswith(".")) == ["iter_0000002", "iter_0000004", "latest"]
    assert checkpoint.read_latest(ck) == "iter_0000004"
    assert json.load(open(os.path.join(ck, "iter_0000004", "meta.json")))["iteration"] == 4


def test_fp16_loss_scale_travels_in_the_universal_state():
    """fp16's dynamic loss scaler (not runnable on CPU) is recorded and restored from state.json, since no
    DeepSpeed optimizer file carries it any more."""
    import torch

    from loop_megatron.checkpoint.universal import _restore_loss_scaler, loss_scaler_state

    class Scaler:
        def __init__(self, scale, it, overflow, hysteresis):
            self.cur_scale, self.cur_iter, self.last_overflow_iter = scale, it, overflow
            self.cur_hysteresis, self.scale_window = hysteresis, 1000

    class Engine:
        def __init__(self, scaler):
            self.optimizer = type("Opt", (), {"loss_scaler": scaler})()

    saved = loss_scaler_state(Engine(Scaler(torch.tensor(2048.0), 37, 30, 1)))
    assert saved == {"cur_scale": 2048.0, "cur_iter": 37, "last_overflow_iter": 30, "cur_hysteresis": 1}
    fresh = Scaler(torch.tensor(65536.0), 0, -1, 2)
    _restore_loss_scaler(Engine(fresh), json.loads(json.dumps(saved)))
    assert float(fresh.cur_scale) == 2048.0 and isinstance(fresh.cur_scale, torch.Tensor)
    assert (fresh.cur_iter, fresh.last_overflow_iter, fresh.cur_hysteresis) == (37, 30, 1)
    assert loss_scaler_state(type("E", (), {"optimizer": object()})()) is None  # fp32/bf16: no scaler
