"""Whether a checkpoint fits this run: the refusals, each one sentence naming the checkpoint.

`find_resume` (training.load) and `find_init_from` (training.init_from) are called by the trainer's
preflight, before any process group, model or DeepSpeed engine exists, so a checkpoint that cannot be
used stops the run at once. A resume needs the same model shape, tokenizer (where recorded) and global
batch size (unless training.override_global_batch); on the saved layout it uses DeepSpeed's own shards,
on another one (TP size, world size, ZeRO stage, CPU offload, precision) the checkpoint's universal/
state, which must be complete. An initialisation from model.pt needs only the same model shape.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, NamedTuple, Optional

from ..config import Config, ConfigError, ModelConfig, data_parallel_size, global_batch_size
from ..data.dataset_meta import LEGACY_TOKENIZER_TYPE, describe_record, same_tokenizer
from . import universal
from .io import resolve_checkpoint
from .layout import CheckpointError, latest_path, meta_path, model_path, read_latest, read_meta
from .tokenizer import tokenizer_for

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


class Resume(NamedTuple):
    """The checkpoint a run resumes from and how: "engine" (same layout: DeepSpeed's own shards and each
    rank's RNG, bit-exact) or "universal" (another layout: the topology-free universal/ state)."""

    tag: str
    meta: Dict[str, Any]
    mode: str


def _layout_here(cfg: Config, world: int, precision: Optional[str]) -> Dict[str, Any]:
    return {"tensor_model_parallel_size": cfg.parallel.tensor_model_parallel_size, "zero_stage": cfg.training.zero_stage,
            "world_size": world, "cpu_offload": bool(cfg.training.cpu_offload), "precision": precision}


def layout_changes(meta: Dict[str, Any], cfg: Config, world: int, precision: Optional[str] = None) -> List[str]:
    """What differs between the checkpoint's layout and this run's ("tensor_model_parallel_size 2 there
    vs 1 here", ...); empty when DeepSpeed's own shards can be resumed. ZeRO-0 keeps whole optimizer
    state on every rank, so there a world-size change alone is not a layout change."""
    here = _layout_here(cfg, world, precision)
    saved = {"tensor_model_parallel_size": meta.get("tensor_model_parallel_size"), "zero_stage": meta.get("zero_stage"),
             "world_size": meta.get("world_size"), "cpu_offload": bool(meta.get("cpu_offload", False)),
             "precision": meta.get("precision")}
    changes = []
    for key, ours in here.items():
        theirs = saved[key]
        if key == "world_size" and saved["zero_stage"] == 0 and here["zero_stage"] == 0:
            continue
        if key == "precision" and (theirs is None or ours is None):
            continue
        if theirs != ours:
            changes.append(f"{key} {theirs} there vs {ours} here")
    return changes


def saved_global_batch(meta: Dict[str, Any]) -> Optional[int]:
    """The checkpoint's global batch size (recorded, or consumed_samples / iteration for older ones)."""
    if meta.get("global_batch_size"):
        return int(meta["global_batch_size"])
    it, consumed = meta.get("iteration") or 0, meta.get("consumed_samples") or 0
    return consumed // it if it > 0 else None


def check_global_batch(meta: Dict[str, Any], cfg: Config, where: str, world: int) -> None:
    """ConfigError (one sentence) when the global batch size changed without --override-global-batch."""
    t = cfg.training
    ours = global_batch_size(cfg, data_parallel_size(cfg, world))
    theirs = saved_global_batch(meta)
    if theirs is None or theirs == ours or t.override_global_batch:
        return
    raise ConfigError(f"checkpoint {where} was trained with global batch size {theirs} but this run uses {ours}; "
                      f"set --global-batch-size {theirs} (keep --micro-batch-size x accumulation x DP equal to it "
                      "on the new layout), or pass --override-global-batch to continue from sample "
                      f"{meta.get('consumed_samples', 0)} with the new size.")


def check_same_tokenizer(meta: Dict[str, Any], tokenizer, where: str, untracked_means_gpt2: bool = True) -> None:
    """ConfigError (one sentence) when the checkpoint was trained with another tokenizer than `tokenizer`.
    A checkpoint without a record predates them: with `untracked_means_gpt2` (resume) it counts as GPT-2's;
    without (initialising weights, e.g. from a Hugging Face import) it is not checked."""
    saved = meta.get("tokenizer")
    ours = tokenizer.describe()
    if not isinstance(saved, dict) or not saved.get("sha256"):
        if untracked_means_gpt2 and tokenizer.tokenizer_type != LEGACY_TOKENIZER_TYPE:
            raise ConfigError(f"checkpoint {where} has no tokenizer record (it predates them, so it was trained "
                              f"with {LEGACY_TOKENIZER_TYPE}) but this run uses {describe_record(ours)}; "
                              "refusing to resume it.")
        return
    if not same_tokenizer(saved, ours):
        raise ConfigError(f"checkpoint {where} was trained with {describe_record(saved)} but this run uses "
                          f"{describe_record(ours)}; refusing to load it with data of another tokenizer.")


def check_compatible(meta: Dict[str, Any], cfg: Config, where: str, world: int, precision: Optional[str] = None) -> str:
    """"engine" or "universal" (see Resume); ConfigError (one sentence) when the checkpoint cannot be
    resumed by this run: another model shape or tokenizer, another global batch size, or another layout
    with no complete universal/ state."""
    check_same_shape(meta, cfg, where)
    check_same_tokenizer(meta, tokenizer_for(cfg), where)
    check_global_batch(meta, cfg, where, world)
    changes = layout_changes(meta, cfg, world, precision)
    if not changes:
        return "engine"
    if not universal.has_universal(where):
        raise ConfigError(f"checkpoint {where} was saved with another layout ({', '.join(changes)}) and holds no "
                          "universal/ state (it predates it, or was saved with ZeRO-0 fp16), so DeepSpeed's shards "
                          "cannot be resumed here; resume on the saved layout or start from its weights with "
                          "--init-from.")
    try:
        universal.check_complete(where)
    except universal.UniversalError as exc:
        raise ConfigError(f"training.load: {exc}") from None
    return "universal"


def find_resume(cfg: Config, world: int, precision: Optional[str] = None) -> Optional[Resume]:
    """The checkpoint to resume from and how (Resume), after checking it fits; None = start fresh."""
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
    return Resume(tag, meta, check_compatible(meta, cfg, folder, world, precision))


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
    check_same_tokenizer(meta, tokenizer_for(cfg), folder, untracked_means_gpt2=False)
    return model_path(folder)
