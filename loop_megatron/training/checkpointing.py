"""Checkpoint save/resume. The folder layout is a contract other tools read:

    <save>/latest                  the tag of the newest complete checkpoint (written last, tmp + rename)
    <save>/iter_0000100/           tag = f"iter_{iteration:07d}"
        model.pt                   consolidated TP=1 fp32 state dict of LoopGPT (global rank 0)
        meta.json                  {"format": "loop_megatron", "version": 1, "iteration", "consumed_samples",
                                    "tensor_model_parallel_size", "zero_stage", "world_size", "config"}
        rng/rank_00000.pt ...      each rank's python/numpy/torch(/cuda) RNG state
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   DeepSpeed's engine files
                                   (optimizer, LR schedule, client_state with the data position)

A checkpoint is written into `<save>/iter_XXXXXXX.tmp/` by all ranks, renamed to its final name by rank
0 once every rank has finished, and only then named in `latest`; older checkpoints beyond `keep_last`
are deleted after that. A folder named iter_XXXXXXX is therefore always complete. The save folder must
be shared by all nodes (as DeepSpeed's own checkpointing requires).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint_io import FORMAT, VERSION, tag_for  # the layout's one definition (tools read it too)
from ..config import Config, ConfigError
from ..model import full_state_dict
from .distributed import barrier, rank, world_size

TAG_RE = re.compile(r"^iter_(\d{7,})$")
# Model fields that change parameter shapes or what the weights mean: a checkpoint must agree on all.
SHAPE_FIELDS = ("vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings", "hidden_size",
                "num_attention_heads", "ffn_hidden_size", "num_layers", "num_loops", "inner_loops",
                "prelude_layers", "coda_layers", "loop_gates")


def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_latest(directory: str) -> Optional[str]:
    path = os.path.join(directory, "latest")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip() or None


def read_meta(directory: str, tag: str) -> Dict[str, Any]:
    path = os.path.join(directory, tag, "meta.json")
    if not os.path.isfile(path):
        raise ConfigError(f"training.load: {path} is missing; {os.path.join(directory, 'latest')} names tag "
                          f"'{tag}' but that checkpoint is not a complete loop_megatron checkpoint.")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"training.load: cannot parse {path} ({exc}).") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"training.load: {path} is not a {FORMAT} checkpoint (format {meta.get('format')!r}).")
    return meta


def check_same_shape(meta: Dict[str, Any], cfg: Config, where: str) -> None:
    """ConfigError (one sentence listing every difference) when the checkpoint's model has another shape."""
    saved_model = (meta.get("config") or {}).get("model") or {}
    diffs = []
    for name in SHAPE_FIELDS:
        ours = getattr(cfg.model, name)
        theirs = saved_model.get(name, ours)
        if theirs != ours:
            diffs.append(f"model.{name} {theirs} there vs {ours} here")
    if diffs:
        raise ConfigError(f"checkpoint {where} has a different model shape ({', '.join(diffs)}); "
                          "refusing to load it.")


def check_compatible(meta: Dict[str, Any], cfg: Config, where: str, world: int) -> None:
    """ConfigError (one sentence) when the checkpoint cannot be resumed by this run."""
    check_same_shape(meta, cfg, where)
    tp_saved, tp = meta.get("tensor_model_parallel_size"), cfg.parallel.tensor_model_parallel_size
    if tp_saved != tp:
        raise ConfigError(f"checkpoint {where} was saved with tensor_model_parallel_size {tp_saved} but this run "
                          f"uses {tp}; its DeepSpeed shards cannot be resumed at another TP size (model.pt "
                          "holds the consolidated weights).")
    stage_saved, stage = meta.get("zero_stage"), cfg.training.zero_stage
    world_saved = meta.get("world_size")
    if stage_saved != stage or (stage > 0 and world_saved != world):
        raise ConfigError(f"checkpoint {where} was saved with ZeRO stage {stage_saved} on {world_saved} ranks but "
                          f"this run uses ZeRO stage {stage} on {world} ranks; DeepSpeed's optimizer state "
                          "cannot be resumed across that change.")


def find_resume(cfg: Config, world: int) -> Optional[Tuple[str, Dict[str, Any]]]:
    """(tag, meta) of the checkpoint to resume from, after checking it fits; None = start fresh."""
    load = cfg.training.load
    if not load:
        return None
    tag = read_latest(load)
    if tag is None:
        return None
    if not os.path.isdir(os.path.join(load, tag)):
        raise ConfigError(f"training.load: {os.path.join(load, 'latest')} names '{tag}' but "
                          f"{os.path.join(load, tag)} does not exist.")
    meta = read_meta(load, tag)
    check_compatible(meta, cfg, os.path.join(load, tag), world)
    return tag, meta


def find_init_from(cfg: Config) -> Optional[str]:
    """Path of the model.pt to initialise from (training.init_from), after checking its shape; None if unset."""
    if not cfg.training.init_from:
        return None
    from ..checkpoint_io import CheckpointError, resolve_checkpoint

    try:
        folder = resolve_checkpoint(cfg.training.init_from)
    except CheckpointError as exc:
        raise ConfigError(f"training.init_from: {exc}") from None
    meta_path = os.path.join(folder, "meta.json")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    check_same_shape(meta, cfg, folder)
    return os.path.join(folder, "model.pt")


# ----------------------------------------------------------------------------------------------------
def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class _MasterWeightsView:
    """Presents a module whose state_dict() holds DeepSpeed's fp32 master copies of its parameters, so
    that `full_state_dict` (TP merge) can consolidate them like ordinary weights."""

    def __init__(self, module: torch.nn.Module, masters: Dict[str, torch.Tensor]):
        self.module, self.masters = module, masters

    def named_parameters(self):
        return self.module.named_parameters()

    def state_dict(self):
        sd = self.module.state_dict()
        return {name: self.masters.get(name, value) for name, value in sd.items()}


def consolidated_state_dict(engine, zero_stage: int) -> Dict[str, torch.Tensor]:
    """TP=1 fp32 state dict of engine.module. Collective over all ranks.

    fp32 training: the module's own parameters (gathered first under ZeRO-3). bf16/fp16 training: the
    optimizer's fp32 master weights (deepspeed.utils.safe_get_full_fp32_param), so model.pt is not
    rounded to 16 bits; where DeepSpeed keeps no master mapping (ZeRO-0 fp16) the 16-bit weights are
    upcast.
    """
    module = engine.module
    low_precision = any(p.dtype in (torch.bfloat16, torch.float16) for p in module.parameters())
    if low_precision:
        from deepspeed.utils import safe_get_full_fp32_param

        masters = {}
        needs_gather = []
        for name, p in module.named_parameters():  # same order on every rank: the calls are collective
            hp = safe_get_full_fp32_param(p)
            if hp is None:
                needs_gather.append(name)
            else:
                masters[name] = hp.detach().float()
        if not needs_gather:
            return full_state_dict(_MasterWeightsView(module, masters))
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return full_state_dict(module)
    return full_state_dict(module)


def save_checkpoint(engine, cfg: Config, iteration: int, consumed_samples: int) -> str:
    """Save on every rank (collective). Returns the final checkpoint folder."""
    save = cfg.training.save
    tag = tag_for(iteration)
    tmp_tag = tag + ".tmp"
    final_dir, tmp_dir = os.path.join(save, tag), os.path.join(save, tmp_tag)
    if rank() == 0:
        os.makedirs(save, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    barrier()
    client_state = {"iteration": iteration, "consumed_samples": consumed_samples, "format": FORMAT}
    engine.save_checkpoint(save, tag=tmp_tag, client_state=client_state, save_latest=False)
    os.makedirs(os.path.join(tmp_dir, "rng"), exist_ok=True)
    _atomic_torch_save(rng_state(), os.path.join(tmp_dir, "rng", f"rank_{rank():05d}.pt"))
    state = consolidated_state_dict(engine, cfg.training.zero_stage)
    if rank() == 0:
        _atomic_torch_save(state, os.path.join(tmp_dir, "model.pt"))
        meta = {"format": FORMAT, "version": VERSION, "iteration": iteration, "consumed_samples": consumed_samples,
                "tensor_model_parallel_size": cfg.parallel.tensor_model_parallel_size,
                "zero_stage": cfg.training.zero_stage, "world_size": world_size(), "config": cfg.to_dict()}
        _atomic_write_text(os.path.join(tmp_dir, "meta.json"), json.dumps(meta, indent=2) + "\n")
    del state
    barrier()
    if rank() == 0:
        if os.path.isdir(final_dir):
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
        _atomic_write_text(os.path.join(save, "latest"), tag + "\n")
        prune(save, cfg.training.keep_last, keep=tag)
    barrier()
    return final_dir


def list_checkpoints(save: str):
    """[(iteration, tag)] of the complete checkpoints in `save`, oldest first."""
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
        if name.startswith("iter_") and name.endswith(".tmp") and name != keep + ".tmp":
            shutil.rmtree(os.path.join(save, name), ignore_errors=True)
    if keep_last <= 0:
        return
    checkpoints = list_checkpoints(save)
    for _, name in checkpoints[:-keep_last]:
        if name != keep:
            shutil.rmtree(os.path.join(save, name), ignore_errors=True)


def load_checkpoint(engine, load: str, tag: str) -> Dict[str, Any]:
    """Restore engine (weights, optimizer, LR schedule) and this rank's RNG; return the client state."""
    path, client_state = engine.load_checkpoint(load, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {os.path.join(load, tag)}.")
    rng_file = os.path.join(load, tag, "rng", f"rank_{rank():05d}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    if dist.is_initialized():
        dist.barrier()
    return client_state or {}
