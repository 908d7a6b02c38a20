"""The on-disk checkpoint layout: names, tags, the `latest` pointer, meta.json, listing and pruning.

This module is the layout's one definition; every reader and writer (the trainer, tools/, the Hugging
Face converter) goes through it::

    <save>/latest                  the tag of the newest complete checkpoint (written last, tmp + rename)
    <save>/iter_0000100/           tag = f"iter_{iteration:07d}"
        model.pt                   consolidated TP=1 state dict of LoopGPT in the training dtype (global rank 0;
                                   fp32 for fp32 runs, bf16 for bf16 runs; io.load_checkpoint returns fp32)
        meta.json                  {"format": "loop_megatron", "version": 1, "iteration", "consumed_samples",
                                    "tensor_model_parallel_size", "zero_stage", "world_size", "config",
                                    "tokenizer": {type, model, name, vocab_size, eod, sha256}}
        tokenizer.json             a HuggingFaceTokenizer's definition (absent for GPT-2's bundled one)
        rng/rank_00000.pt ...      each rank's python/numpy/torch(/cuda) RNG state (trainer only)
        universal/                 fp32 masters + AdamW moments per parameter, step, schedule (universal.py):
                                   the one copy of the optimizer state
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   DeepSpeed's engine files, only
                                   in checkpoints written before universal/ was the one copy, and where it
                                   cannot be (engine.DEEPSPEED_SHARDS)

The trainer builds a checkpoint in `<save>/iter_XXXXXXX.tmp/` and renames it when whole, so a folder
named iter_XXXXXXX is always complete. A folder written without an engine (e.g. imported from Hugging
Face) has model.pt and meta.json only, and says so with ``"engine_state": false``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

from ..errors import LoopMegatronError
from ..utils import fs

FORMAT = "loop_megatron"
VERSION = 1
MODEL_FILE = "model.pt"
META_FILE = "meta.json"
LATEST_FILE = "latest"
TOKENIZER_FILE = "tokenizer.json"
RNG_DIR = "rng"
TEMP_SUFFIX = ".tmp"
TAG_RE = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(LoopMegatronError):
    """A checkpoint folder that cannot be read; the message is one sentence naming the path."""


# ----------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------
def tag_for(iteration: int) -> str:
    return f"iter_{int(iteration):07d}"


def temp_tag(tag: str) -> str:
    """The folder name a checkpoint is built under before it is renamed to `tag`."""
    return tag + TEMP_SUFFIX


def model_path(folder: str) -> str:
    return os.path.join(folder, MODEL_FILE)


def meta_path(folder: str) -> str:
    return os.path.join(folder, META_FILE)


def tokenizer_path(folder: str) -> str:
    return os.path.join(folder, TOKENIZER_FILE)


def latest_path(save_dir: str) -> str:
    return os.path.join(save_dir, LATEST_FILE)


def rng_path(folder: str, rank: int) -> str:
    return os.path.join(folder, RNG_DIR, f"rank_{rank:05d}.pt")


# ----------------------------------------------------------------------------------------------------
# The `latest` pointer
# ----------------------------------------------------------------------------------------------------
def read_latest(save_dir: str) -> Optional[str]:
    """The tag named in `<save_dir>/latest`, or None when the file is missing or empty."""
    path = latest_path(save_dir)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip() or None


def write_latest(save_dir: str, tag: str, fsync: bool = False) -> None:
    fs.write_text(latest_path(save_dir), tag + "\n", fsync=fsync)


# ----------------------------------------------------------------------------------------------------
# meta.json
# ----------------------------------------------------------------------------------------------------
def make_meta(config: Dict[str, Any], iteration: int, consumed_samples: int, tensor_model_parallel_size: int,
              zero_stage: int, world_size: int, engine_state: Optional[bool] = None) -> Dict[str, Any]:
    """The meta.json record; `engine_state=False` marks a folder without DeepSpeed engine files."""
    meta = {"format": FORMAT, "version": VERSION, "iteration": int(iteration),
            "consumed_samples": int(consumed_samples), "tensor_model_parallel_size": tensor_model_parallel_size,
            "zero_stage": zero_stage, "world_size": world_size}
    if engine_state is not None:
        meta["engine_state"] = engine_state
    meta["config"] = config
    return meta


def write_meta(folder: str, meta: Dict[str, Any], fsync: bool = False, trailing_newline: bool = False) -> None:
    fs.write_json(meta_path(folder), meta, indent=2, trailing_newline=trailing_newline, fsync=fsync)


def read_meta(folder: str) -> Dict[str, Any]:
    """meta.json of a tag folder, checked to be ours and to carry the config (CheckpointError otherwise)."""
    path = meta_path(folder)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}).") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{folder}: not a loop_megatron checkpoint (meta.json has format {found!r}, "
                              f"expected {FORMAT!r}).")
    if "config" not in meta:
        raise CheckpointError(f"{path}: has no 'config' entry, so the model shape is unknown.")
    return meta


# ----------------------------------------------------------------------------------------------------
# Listing and pruning
# ----------------------------------------------------------------------------------------------------
def list_tags(save_dir: str) -> List[str]:
    """Tag folders under `save_dir` that hold a meta.json, oldest first (ours by iteration, others after)."""
    if not os.path.isdir(save_dir):
        return []
    tags = [t for t in os.listdir(save_dir)
            if not t.endswith(TEMP_SUFFIX) and os.path.isfile(meta_path(os.path.join(save_dir, t)))]
    return sorted(tags, key=lambda t: (0, int(t[5:])) if TAG_RE.match(t) else (1, t))


def list_checkpoints(save: str) -> List[Tuple[int, str]]:
    """[(iteration, tag)] of the complete checkpoint folders in `save`, oldest first."""
    found = []
    if os.path.isdir(save):
        for name in os.listdir(save):
            m = TAG_RE.match(name)
            if m and os.path.isdir(os.path.join(save, name)):
                found.append((int(m.group(1)), name))
    return sorted(found)


def prune(save: str, keep_last: int, keep: str) -> None:
    """Delete all but the newest `keep_last` checkpoints (never `keep`), and stale temporary folders."""
    for name in os.listdir(save):
        if name.startswith("iter_") and name.endswith(TEMP_SUFFIX) and name != temp_tag(keep):
            shutil.rmtree(os.path.join(save, name), ignore_errors=True)
    if keep_last <= 0:
        return
    checkpoints = list_checkpoints(save)
    for _, name in checkpoints[:-keep_last]:
        if name != keep:
            shutil.rmtree(os.path.join(save, name), ignore_errors=True)


def has_engine_files(folder: str) -> bool:
    """True when `folder` holds DeepSpeed engine files (model/optimizer shards)."""
    return os.path.isdir(folder) and any(
        f.endswith(".pt") and ("mp_rank_" in f or "zero_pp_rank_" in f or "optim_states" in f)
        for f in os.listdir(folder))
