"""Reading and writing the consolidated checkpoint files the trainer saves (no DeepSpeed needed).

Layout (one folder per saved step; the trainer adds DeepSpeed engine files beside these)::

    <save>/latest                  text file holding the newest complete tag
    <save>/iter_0000100/model.pt   consolidated TP=1 fp32 state dict of LoopGPT
    <save>/iter_0000100/meta.json  {"format": "loop_megatron", "version": 1, "iteration": ..., "config": {...}}

Tools that only need the weights (conversion, evaluation, generation) go through this module. A folder
written by `save_checkpoint_files` (e.g. imported from Hugging Face) has model.pt and meta.json but no
engine files; its meta.json says so with ``"engine_state": false``, and the trainer should initialise
weights from model.pt instead of resuming.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from .config import Config

FORMAT = "loop_megatron"
VERSION = 1
MODEL_FILE = "model.pt"
META_FILE = "meta.json"
LATEST_FILE = "latest"
_TAG_RE = re.compile(r"^iter_\d+$")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read; the message is one sentence naming the path."""


def tag_for(iteration: int) -> str:
    return f"iter_{int(iteration):07d}"


def list_tags(save_dir: str) -> List[str]:
    """Tag folders under `save_dir` that hold a meta.json, oldest first."""
    if not os.path.isdir(save_dir):
        return []
    tags = [t for t in os.listdir(save_dir)
            if not t.endswith(".tmp") and os.path.isfile(os.path.join(save_dir, t, META_FILE))]
    return sorted(tags, key=lambda t: (0, int(t[5:])) if _TAG_RE.match(t) else (1, t))


def _has_engine_files(folder: str) -> bool:
    return os.path.isdir(folder) and any(
        f.endswith(".pt") and ("mp_rank_" in f or "zero_pp_rank_" in f or "optim_states" in f)
        for f in os.listdir(folder))


def _read_meta(folder: str) -> Dict[str, Any]:
    path = os.path.join(folder, META_FILE)
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


def _tags_hint(save_dir: str) -> str:
    tags = list_tags(save_dir)
    return f"available tags: {', '.join(tags)}" if tags else "it holds no checkpoint tags"


def resolve_checkpoint(path: str, tag: Optional[str] = None) -> str:
    """The tag folder of a checkpoint: `path` may be the save dir (uses `tag`, else `latest`) or a tag
    folder itself. Raises CheckpointError with one sentence when the folder is not ours or the tag is
    missing (listing the tags that exist)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint folder.")
    path = os.path.normpath(path)
    if os.path.isfile(os.path.join(path, META_FILE)):  # a tag folder
        if tag is not None and tag != os.path.basename(path):
            if os.path.isfile(os.path.join(path, tag, META_FILE)):
                path = os.path.join(path, tag)
            else:
                parent = os.path.dirname(path)
                raise CheckpointError(f"{path}: is the checkpoint tag {os.path.basename(path)!r}, not the "
                                      f"requested tag {tag!r} ({_tags_hint(parent)}).")
        folder = path
    else:
        if tag is None:
            latest = os.path.join(path, LATEST_FILE)
            if not os.path.isfile(latest):
                tags = list_tags(path)
                if tags:
                    raise CheckpointError(f"{path}: has no 'latest' file; pass a tag ({_tags_hint(path)}).")
                if _has_engine_files(path):
                    raise CheckpointError(f"{path}: holds DeepSpeed engine files but no meta.json, so it was not "
                                          f"written by loop_megatron (or is a tag folder without a consolidated model).")
                raise CheckpointError(f"{path}: not a loop_megatron checkpoint (no meta.json and no 'latest' file).")
            with open(latest, encoding="utf-8") as f:
                tag = f.read().strip()
            if not tag:
                raise CheckpointError(f"{latest}: is empty; pass a tag ({_tags_hint(path)}).")
        folder = os.path.join(path, tag)
        if not os.path.isdir(folder):
            raise CheckpointError(f"{path}: has no checkpoint tag {tag!r} ({_tags_hint(path)}).")
        if not os.path.isfile(os.path.join(folder, META_FILE)):
            raise CheckpointError(f"{folder}: not a loop_megatron checkpoint (no meta.json; the save may be "
                                  f"incomplete) ({_tags_hint(path)}).")
    _read_meta(folder)
    if not os.path.isfile(os.path.join(folder, MODEL_FILE)):
        if _has_engine_files(folder):
            raise CheckpointError(f"{folder}: the checkpoint has no consolidated model.pt, only DeepSpeed engine "
                                  f"shards; re-save it with the loop_megatron trainer (which writes model.pt).")
        raise CheckpointError(f"{folder}: the checkpoint has no model.pt.")
    return folder


def load_checkpoint(path: str, tag: Optional[str] = None) -> Tuple[Config, Dict[str, torch.Tensor], Dict[str, Any]]:
    """(Config, TP=1 state dict on CPU, meta) of a checkpoint folder (save dir or tag folder)."""
    folder = resolve_checkpoint(path, tag)
    meta = _read_meta(folder)
    cfg = Config.from_dict(meta["config"], source=os.path.join(folder, META_FILE))
    sd = torch.load(os.path.join(folder, MODEL_FILE), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{os.path.join(folder, MODEL_FILE)}: is not a state dict of tensors.")
    meta = dict(meta, path=folder)
    return cfg, sd, meta


def load_model(path: str, tag: Optional[str] = None, num_loops: Optional[int] = None,
               device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A LoopGPT (TP=1, eval mode) with the checkpoint's weights. `num_loops` changes the default number
    of loop iterations used at inference (extra iterations reuse the last trained gate)."""
    from .model import LoopGPT, load_full_state_dict

    cfg, sd, _ = load_checkpoint(path, tag)
    model = LoopGPT(cfg.model)
    load_full_state_dict(model, sd)
    if num_loops is not None:
        if num_loops < 1:
            raise ValueError(f"num_loops must be >= 1, got {num_loops}.")
        model.loop.num_loops = num_loops
    return model.to(device=device, dtype=dtype).eval()


def _write_atomic(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint_files(state_dict: Dict[str, torch.Tensor], config: Config, out_dir: str, iteration: int = 0,
                          consumed_samples: int = 0, extra_meta: Optional[Dict[str, Any]] = None) -> str:
    """Write `out_dir/iter_XXXXXXX/{model.pt, meta.json}` and `out_dir/latest` (temporary names, renamed
    when whole; meta.json and then `latest` last, so a half-written tag is never picked up). Returns the
    tag folder. These folders have no DeepSpeed engine state (``"engine_state": false`` in meta.json)."""
    tag = tag_for(iteration)
    folder = os.path.join(out_dir, tag)
    os.makedirs(folder, exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    _write_atomic(os.path.join(folder, MODEL_FILE), lambda p: torch.save(sd, p))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "iteration": int(iteration),
        "consumed_samples": int(consumed_samples),
        "tensor_model_parallel_size": 1,
        "zero_stage": 0,
        "world_size": 1,
        "engine_state": False,
        "config": config.to_dict(),
    }
    meta.update(extra_meta or {})

    def write_meta(p):
        with open(p, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)

    _write_atomic(os.path.join(folder, META_FILE), write_meta)

    def write_latest(p):
        with open(p, "w", encoding="utf-8") as f:
            f.write(tag + "\n")

    _write_atomic(os.path.join(out_dir, LATEST_FILE), write_latest)
    return folder
