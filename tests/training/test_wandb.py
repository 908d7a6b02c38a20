"""Weights & Biases offline: a run with --wandb-project writes wandb/offline-run-*/ holding the same scalars,
under the same tags and steps, as its TensorBoard events (read back from the run's .wandb file)."""
import glob
import json
import os
import struct

import pytest

from tests.training.helpers import pretrain_in_process, tiny_config, write_corpus

wandb = pytest.importorskip("wandb")  # a dev extra: `make venv` (CI) installs it, so this runs in CI

_BLOCK = 32768  # the .wandb file is a LevelDB-style log of 32 KiB blocks of protobuf Record chunks


def wandb_records(path):
    """The Records of a .wandb file (its 7-byte ':W&B' header, then chunks: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start, MIDDLE/LAST continue
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_history(path):
    """{(tag, step): value} of every history row of a .wandb file (W&B's own _step/_runtime/... left out)."""
    out = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            out.update({(tag, row["_step"]): value for tag, value in row.items() if not tag.startswith("_")})
    return out


def tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(folder)
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def test_offline_run_holds_the_tensorboard_scalars(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = str(tmp_path / "run")
    cfg = tiny_config(write_corpus(str(tmp_path / "data")), run_dir, **{
        "training.train_iters": 4, "training.eval_interval": 2, "training.log_interval": 2,
        "training.wandb_project": "loop-megatron-test", "training.wandb_exp_name": "tiny-offline"})
    pretrain_in_process(cfg)
    folders = glob.glob(os.path.join(run_dir, "wandb", "wandb", "offline-run-*"))
    assert len(folders) == 1, folders  # default --wandb-save-dir: <run_dir>/wandb
    history = wandb_history(glob.glob(os.path.join(folders[0], "*.wandb"))[0])
    tb = tensorboard_scalars(os.path.join(run_dir, "tensorboard"))
    assert {("train/loss", s) for s in (1, 2, 3, 4)} | {("valid/loss", 2), ("valid/loss", 4), ("train/lr", 4)} <= set(tb)
    assert set(history) == set(tb)
    for key, value in tb.items():  # TensorBoard stores float32
        assert history[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    runs = [r.run for r in wandb_records(glob.glob(os.path.join(folders[0], "*.wandb"))[0])
            if r.WhichOneof("record_type") == "run"]
    assert runs and (runs[0].project, runs[0].display_name) == ("loop-megatron-test", "tiny-offline")
    config = {item.key: json.loads(item.value_json) for item in runs[0].config.update}
    assert config["training"]["train_iters"] == 4 and config["model"]["hidden_size"] == 32  # the resolved config
