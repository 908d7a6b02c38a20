"""DeepSpeed engine checkpoints: collective save, resume, and consolidation of the weights to TP=1 fp32.

`save_engine_checkpoint` is called by every rank: each writes its DeepSpeed shards (optimizer, LR
schedule, client_state with the data position) and its RNG state into `<save>/iter_XXXXXXX.tmp/`; rank 0
adds the consolidated model.pt, meta.json (with the tokenizer record) and the
tokenizer file (checkpoint/tokenizer.py); once every rank is done rank 0 renames the folder to its
final tag, points `latest` at it and prunes beyond `keep_last`. A folder named iter_XXXXXXX is therefore
always complete. The save folder must be shared by all nodes (as DeepSpeed's own checkpointing requires).
`load_engine_checkpoint` restores the engine and this rank's RNG. Every save also writes the
topology-free `universal/` state (`universal.py`) that resumes on another TP/DP/ZeRO layout. Names and
files: `layout.py`.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Dict

import torch

from ..config import Config, data_parallel_size, global_batch_size
from ..model import full_state_dict
from ..utils import fs
from ..utils.distributed import barrier, rank, world_size
from .layout import FORMAT, make_meta, model_path, prune, tag_for, temp_tag, write_latest, write_meta
from .rng import restore_rng, save_rng
from .tokenizer import save_tokenizer, tokenizer_for
from .universal import save_universal


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


def run_layout(engine, cfg: Config) -> Dict[str, Any]:
    """How this run is laid out over ranks (recorded in meta.json and universal/state.json)."""
    t, tp = cfg.training, cfg.parallel.tensor_model_parallel_size
    dp = data_parallel_size(cfg, world_size())
    dtype = next(engine.module.parameters()).dtype
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    return {"tensor_model_parallel_size": tp, "data_parallel_size": dp, "world_size": world_size(),
            "zero_stage": t.zero_stage, "cpu_offload": bool(t.cpu_offload), "precision": precision,
            "global_batch_size": global_batch_size(cfg, dp)}


def save_engine_checkpoint(engine, cfg: Config, iteration: int, consumed_samples: int) -> str:
    """Save on every rank (collective). Returns the final checkpoint folder."""
    save = cfg.training.save
    tag = tag_for(iteration)
    tmp_tag = temp_tag(tag)
    final_dir, tmp_dir = os.path.join(save, tag), os.path.join(save, tmp_tag)
    if rank() == 0:
        os.makedirs(save, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    barrier()
    client_state = {"iteration": iteration, "consumed_samples": consumed_samples, "format": FORMAT}
    engine.save_checkpoint(save, tag=tmp_tag, client_state=client_state, save_latest=False)
    save_rng(tmp_dir, rank())
    state = consolidated_state_dict(engine, cfg.training.zero_stage)
    if rank() == 0:
        fs.torch_save(state, model_path(tmp_dir))
    del state
    layout = run_layout(engine, cfg)
    universal = save_universal(engine, tmp_dir, iteration=iteration, consumed_samples=consumed_samples,
                               global_batch_size=layout["global_batch_size"], seed=cfg.training.seed, layout=layout)
    if rank() == 0:
        meta = make_meta(cfg.to_dict(), iteration, consumed_samples, cfg.parallel.tensor_model_parallel_size,
                         cfg.training.zero_stage, world_size())
        meta.update({k: layout[k] for k in ("global_batch_size", "cpu_offload", "precision")}, universal=universal)
        meta["tokenizer"] = save_tokenizer(tmp_dir, tokenizer_for(cfg), fsync=True)
        write_meta(tmp_dir, meta, fsync=True, trailing_newline=True)
    barrier()
    if rank() == 0:
        fs.replace_dir(tmp_dir, final_dir)
        write_latest(save, tag, fsync=True)
        prune(save, cfg.training.keep_last, keep=tag)
    barrier()
    return final_dir


def load_engine_checkpoint(engine, load: str, tag: str) -> Dict[str, Any]:
    """Restore engine (weights, optimizer, LR schedule) and this rank's RNG; return the client state."""
    path, client_state = engine.load_checkpoint(load, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {os.path.join(load, tag)}.")
    restore_rng(os.path.join(load, tag), rank())
    barrier()
    return client_state or {}
