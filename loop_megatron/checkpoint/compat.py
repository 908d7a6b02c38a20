"""Whether a checkpoint fits this run: the refusals, each one sentence naming the checkpoint.

`find_resume` (training.load) and `find_init_from` (training.init_from) are called by the trainer's
preflight, before any process group, model or DeepSpeed engine exists, so a checkpoint that cannot be
used stops the run at once. A resume needs the same model shape, TP size and ZeRO layout (DeepSpeed's
shards are layout-specific); an initialisation from model.pt needs only the same model shape.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

from ..config import Config, ConfigError, ModelConfig
from .io import resolve_checkpoint
from .layout import CheckpointError, latest_path, meta_path, model_path, read_latest, read_meta

# Model fields that change parameter shapes or what the weights mean: a checkpoint must agree on all.
SHAPE_FIELDS = ("vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings", "hidden_size",
                "num_attention_heads", "ffn_hidden_size", "num_layers", "num_loops", "inner_loops",
                "prelude_layers", "coda_layers", "loop_gates", "loop_gate_count", "loop_injection",
                "loop_state_init")


def check_same_shape(meta: Dict[str, Any], cfg: Config, where: str) -> None:
    """ConfigError (one sentence listing every difference) when the checkpoint's model has another shape."""
    saved_model = (meta.get("config") or {}).get("model") or {}
    diffs = []
    for name in SHAPE_FIELDS:
        ours = getattr(cfg.model, name)
        # A field a checkpoint does not record predates it: it was saved with the field's default.
        theirs = saved_model.get(name, getattr(ModelConfig, name, ours))
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
    folder = os.path.join(load, tag)
    if not os.path.isdir(folder):
        raise ConfigError(f"training.load: {latest_path(load)} names '{tag}' but {folder} does not exist.")
    if not os.path.isfile(meta_path(folder)):
        raise ConfigError(f"training.load: {meta_path(folder)} is missing; {latest_path(load)} names tag "
                          f"'{tag}' but that checkpoint is not a complete loop_megatron checkpoint.")
    try:
        meta = read_meta(folder)
    except CheckpointError as exc:
        raise ConfigError(f"training.load: {exc}") from None
    check_compatible(meta, cfg, folder, world)
    return tag, meta


def find_init_from(cfg: Config) -> Optional[str]:
    """Path of the model.pt to initialise from (training.init_from), after checking its shape; None if unset."""
    if not cfg.training.init_from:
        return None
    try:
        folder = resolve_checkpoint(cfg.training.init_from)
        meta = read_meta(folder)
    except CheckpointError as exc:
        raise ConfigError(f"training.init_from: {exc}") from None
    check_same_shape(meta, cfg, folder)
    return model_path(folder)
