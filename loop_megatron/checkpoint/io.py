"""Reading and writing a checkpoint's consolidated weights (no DeepSpeed needed).

Tools that only need the weights (conversion, evaluation, generation) and the trainer's
`--init-from` go through this module: `resolve_checkpoint` finds the tag folder of a save dir or tag
folder (one sentence naming the path when it is not ours), `load_checkpoint` returns its config, TP=1
state dict and meta, `load_model` a ready LoopGPT, and `save_checkpoint_files` writes a folder with
model.pt and meta.json but no engine files (``"engine_state": false``; the trainer initialises weights
from such a folder instead of resuming). The folder layout itself is defined in `layout.py`.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import torch

from ..config import Config
from ..utils import fs
from .layout import (CheckpointError, has_engine_files, latest_path, list_tags, make_meta, meta_path, model_path,
                     read_meta, tag_for, write_latest, write_meta)


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
    if os.path.isfile(meta_path(path)):  # a tag folder
        if tag is not None and tag != os.path.basename(path):
            if os.path.isfile(meta_path(os.path.join(path, tag))):
                path = os.path.join(path, tag)
            else:
                parent = os.path.dirname(path)
                raise CheckpointError(f"{path}: is the checkpoint tag {os.path.basename(path)!r}, not the "
                                      f"requested tag {tag!r} ({_tags_hint(parent)}).")
        folder = path
    else:
        if tag is None:
            latest = latest_path(path)
            if not os.path.isfile(latest):
                tags = list_tags(path)
                if tags:
                    raise CheckpointError(f"{path}: has no 'latest' file; pass a tag ({_tags_hint(path)}).")
                if has_engine_files(path):
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
        if not os.path.isfile(meta_path(folder)):
            raise CheckpointError(f"{folder}: not a loop_megatron checkpoint (no meta.json; the save may be "
                                  f"incomplete) ({_tags_hint(path)}).")
    read_meta(folder)
    if not os.path.isfile(model_path(folder)):
        if has_engine_files(folder):
            raise CheckpointError(f"{folder}: the checkpoint has no consolidated model.pt, only DeepSpeed engine "
                                  f"shards; re-save it with the loop_megatron trainer (which writes model.pt).")
        raise CheckpointError(f"{folder}: the checkpoint has no model.pt.")
    return folder


def load_checkpoint(path: str, tag: Optional[str] = None) -> Tuple[Config, Dict[str, torch.Tensor], Dict[str, Any]]:
    """(Config, TP=1 fp32 state dict on CPU, meta) of a checkpoint folder (save dir or tag folder)."""
    folder = resolve_checkpoint(path, tag)
    meta = read_meta(folder)
    cfg = Config.from_dict(meta["config"], source=meta_path(folder))
    sd = torch.load(model_path(folder), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{model_path(folder)}: is not a state dict of tensors.")
    # model.pt holds the weights in the training dtype (bf16 for a bf16 run); readers get fp32 as before.
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    meta = dict(meta, path=folder)
    return cfg, sd, meta


def load_model(path: str, tag: Optional[str] = None, num_loops: Optional[int] = None,
               device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A LoopGPT (TP=1, eval mode) with the checkpoint's weights. `num_loops` changes the default number
    of loop iterations used at inference (extra iterations reuse the last trained gate)."""
    from ..model import LoopGPT, load_full_state_dict

    cfg, sd, _ = load_checkpoint(path, tag)
    model = LoopGPT(cfg.model)
    load_full_state_dict(model, sd)
    if num_loops is not None:
        if num_loops < 1:
            raise ValueError(f"num_loops must be >= 1, got {num_loops}.")
        model.loop.num_loops = num_loops
    return model.to(device=device, dtype=dtype).eval()


def save_checkpoint_files(state_dict: Dict[str, torch.Tensor], config: Config, out_dir: str, iteration: int = 0,
                          consumed_samples: int = 0, extra_meta: Optional[Dict[str, Any]] = None) -> str:
    """Write `out_dir/iter_XXXXXXX/{model.pt, meta.json}` and `out_dir/latest` (temporary names, renamed
    when whole; meta.json and then `latest` last, so a half-written tag is never picked up). Returns the
    tag folder. These folders have no DeepSpeed engine state (``"engine_state": false`` in meta.json)."""
    tag = tag_for(iteration)
    folder = os.path.join(out_dir, tag)
    os.makedirs(folder, exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    fs.torch_save(sd, model_path(folder))
    meta = make_meta(config.to_dict(), iteration, consumed_samples, tensor_model_parallel_size=1, zero_stage=0,
                     world_size=1, engine_state=False)
    meta.update(extra_meta or {})
    write_meta(folder, meta)
    write_latest(out_dir, tag)
    return folder
