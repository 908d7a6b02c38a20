"""Whether a checkpoint fits this run: the refusals, each one sentence naming the checkpoint.

`find_resume` (training.load) and `find_init_from` (training.init_from) are called by the trainer's
preflight, before any process group, model or DeepSpeed engine exists, so a checkpoint that cannot be
used stops the run at once. A resume needs the same model shape, tokenizer (where recorded) and global
batch size (unless training.override_global_batch); it uses the checkpoint's universal/ state (which
must be complete), or DeepSpeed's own shards on the saved layout where the checkpoint holds them (older
checkpoints, and runs whose optimizer state universal/ cannot hold). An initialisation from model.pt needs only the same model shape.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from ..config import Config, ConfigError, ModelConfig, data_parallel_size, global_batch_size
from ..data.dataset_meta import LEGACY_TOKENIZER_TYPE, describe_record, same_tokenizer
from . import universal
from .io import resolve_checkpoint
from .layout import (LATEST_FILE, CheckpointError, has_engine_files, latest_path, list_tags, meta_path, model_path,
                     read_latest, read_meta)
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
    """The checkpoint a run resumes from and how: "engine" (same layout, a checkpoint holding DeepSpeed's
    own shards: those and each rank's RNG, bit-exact), "universal" (the topology-free universal/ state: on
    the same layout with each rank's RNG, bit-exact; on another layout with the RNG reseeded), "weights"
    (training.no_load_optim: the fp32 masters and the run's position, a fresh optimizer; any layout) or
    "finetune" (training.finetune: the weights only, iteration 0; see checkpoint/partial.py).
    `save_dir` is the folder holding the tag (training.load itself, or its parent when training.load
    names a tag folder or a `latest` file); `how` says how the tag was chosen; `notes` are lines to log
    (schedule decisions)."""

    tag: str
    meta: Dict[str, Any]
    mode: str
    save_dir: str = ""
    how: str = ""
    notes: Tuple[str, ...] = ()
    same_layout: bool = True
    """The checkpoint was saved on this run's layout (its per-rank RNG states apply here)."""

    @property
    def folder(self) -> str:
        return os.path.join(self.save_dir, self.tag)


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
    if not changes and has_engine_files(where):
        return "engine"  # DeepSpeed's own shards (a checkpoint written before universal/ was the one copy)
    if not changes and not universal.has_universal(where):
        raise ConfigError(f"checkpoint {where} holds neither DeepSpeed's shards nor a universal/ state, so it has "
                          "no optimizer state to resume; start from its weights with --init-from, or resume it with "
                          "--no-load-optim.")
    if not universal.has_universal(where):
        raise ConfigError(f"checkpoint {where} was saved with another layout ({', '.join(changes)}) and holds no "
                          f"universal/ state ({_why_no_universal(meta)}), so DeepSpeed's shards cannot be resumed "
                          "here; resume on the saved layout or start from its weights with --init-from.")
    try:
        universal.check_complete(where)
    except universal.UniversalError as exc:
        raise ConfigError(f"training.load: {exc}") from None
    return "universal"


def _why_no_universal(meta: Dict[str, Any]) -> str:
    """The true reason a checkpoint folder has no universal/ state, from what its meta.json records."""
    if "universal" not in meta:
        return "the checkpoint predates universal state"
    if meta.get("universal"):
        return "meta.json records that it was written, so the universal/ folder was removed since"
    reason = meta.get("universal_skipped")
    return (f"the save wrote none: {reason}" if reason else
            f"the save wrote none: its optimizer ({meta.get('precision', '?')}, ZeRO-{meta.get('zero_stage', '?')}) "
            "kept no per-parameter state that could be read")


def locate_resume(load: str, save: str = "") -> Optional[Tuple[str, str, str]]:
    """(save_dir, tag, how) of the checkpoint `load` names, or None for a fresh start: an existing folder
    that holds no checkpoint yet, or a missing `load` that is the run's own `save` folder (Megatron's
    `--save X --load X` "resume if there is anything" idiom, which every Megatron example script uses).
    `load` is the save folder (its `latest` tag), a tag folder in it (a folder with meta.json) or a
    `latest` file. ConfigError (one sentence) for any other path that does not exist (a typo must not
    train from scratch), a save folder with checkpoint tags but no `latest`, or a `latest` naming a
    missing tag."""
    if not os.path.exists(load):
        if save and os.path.normpath(os.path.abspath(load)) == os.path.normpath(os.path.abspath(save)):
            return None
        raise ConfigError(f"training.load: {load} does not exist; give the save folder, a tag folder in it (e.g. "
                          f"{os.path.join(load, 'iter_0000020')}) or its '{LATEST_FILE}' file (an existing empty "
                          "folder starts fresh).")
    if os.path.isfile(load):
        with open(load, encoding="utf-8") as f:
            tag = f.read().strip()
        if not tag:
            raise ConfigError(f"training.load: {load} is empty; it should name a checkpoint tag.")
        save_dir = os.path.dirname(os.path.normpath(load))
        how = f"tag named by {load}"
    elif os.path.isfile(meta_path(load)):
        norm = os.path.normpath(load)
        save_dir, tag = os.path.dirname(norm), os.path.basename(norm)
        how = "the tag folder given"
    else:
        tag = read_latest(load)
        if tag is None:
            tags = list_tags(load)
            if tags:
                raise ConfigError(f"training.load: {load} holds checkpoints ({', '.join(tags)}) but no "
                                  f"'{LATEST_FILE}' file; give the tag folder to resume from, e.g. "
                                  f"{os.path.join(load, tags[-1])}.")
            if has_engine_files(load):
                raise ConfigError(f"training.load: {load} holds DeepSpeed engine files but no meta.json, so it is "
                                  "not a loop_megatron checkpoint (or a tag folder without its meta.json).")
            return None
        save_dir, how = load, f"tag named by {latest_path(load)}"
    folder = os.path.join(save_dir, tag)
    if not os.path.isdir(folder):
        raise ConfigError(f"training.load: {how[len('tag named by '):]} names '{tag}' but {folder} does not exist.")
    if not os.path.isfile(meta_path(folder)):
        raise ConfigError(f"training.load: {meta_path(folder)} is missing; {how} is '{tag}' but that checkpoint "
                          "is not a complete loop_megatron checkpoint.")
    return save_dir, tag, how


def _training_dict(meta: Dict[str, Any]) -> Dict[str, Any]:
    return (meta.get("config") or {}).get("training") or {}


def schedule_changes(meta: Dict[str, Any], cfg: Config) -> List[str]:
    """How this run's LR schedule differs from the checkpoint's ("training.lr 0.001 there vs 0.002 here",
    ...); empty when the curve is the same (config.lr_schedule: the effective style, rates, warm-up,
    horizon and WSD phase). train_iters counts only where it is the decay horizon (lr_decay_iters 0 on
    either side, iteration-based): with a fixed lr_decay_iters, training longer keeps the curve."""
    import dataclasses

    from ..config import SCHEDULE_FIELDS, TrainingConfig, lr_schedule

    saved, here = _training_dict(meta), dataclasses.asdict(cfg.training)
    theirs, ours = lr_schedule(saved), lr_schedule(here)
    if theirs == ours:
        return []

    def value(t: Dict[str, Any], k: str) -> Any:
        return t.get(k, getattr(TrainingConfig, k))

    changes = [f"training.{k} {value(saved, k)} there vs {value(here, k)} here" for k in SCHEDULE_FIELDS
               if value(saved, k) != value(here, k)]
    if theirs.unit == ours.unit == "iterations" and theirs.decay != ours.decay and \
            value(saved, "train_iters") != value(here, "train_iters") and \
            not (value(saved, "lr_decay_iters") and value(here, "lr_decay_iters")):
        changes.append(f"training.train_iters {value(saved, 'train_iters')} there vs {value(here, 'train_iters')} here")
    horizon = [i for i, c in enumerate(changes) if c.split(" ")[0] in (
        "training.train_iters", "training.lr_decay_iters", "training.train_samples", "training.lr_decay_samples")]
    if theirs.decay != ours.decay and horizon:
        changes[horizon[-1]] += f" (decay horizon {theirs.decay} there vs {ours.decay} here)"
    return changes or [f"the effective schedule {theirs} there vs {ours} here"]


def resolve_schedule(meta: Dict[str, Any], cfg: Config, where: str) -> List[str]:
    """Notes to log about the LR schedule of a resume; ConfigError (one sentence naming the fields and
    both values) when it differs from the checkpoint's and neither training.override_opt_param_scheduler
    (this run's values win) nor training.use_checkpoint_opt_param_scheduler (the checkpoint's win, written
    into cfg.training here: every field of config.SCHEDULE_FIELDS but train_samples, with the decay horizon
    as lr_decay_iters / lr_decay_samples) is set."""
    from ..config import SCHEDULE_FIELDS, TrainingConfig, lr_schedule

    t = cfg.training
    changes = schedule_changes(meta, cfg)
    if not changes:
        return []
    it = int(meta.get("iteration", 0))
    saved = _training_dict(meta)
    theirs, ours = lr_schedule(saved), lr_schedule(t)
    if t.override_opt_param_scheduler:
        return [f"LR schedule from this run (--override-opt_param-scheduler), not the checkpoint's: "
                f"{'; '.join(changes)}; from iteration {it} on every step takes this run's curve's LR at its position."]
    if t.use_checkpoint_opt_param_scheduler:
        if theirs.unit != ours.unit:
            raise ConfigError(f"checkpoint {where} counts its LR schedule in {theirs.unit} and this run in {ours.unit} "
                              "(training.train_samples decides), so --use-checkpoint-opt_param-scheduler cannot keep "
                              "it; size this run the same way, or pass --override-opt_param-scheduler instead.")
        for k in SCHEDULE_FIELDS:
            if k != "train_samples":
                setattr(t, k, saved.get(k, getattr(TrainingConfig, k)))
        horizon = "lr_decay_samples" if theirs.unit == "samples" else "lr_decay_iters"
        setattr(t, horizon, theirs.decay if theirs.decay else getattr(t, horizon))
        kept = ", ".join(f"{k} {getattr(t, k)}" for k in SCHEDULE_FIELDS if k != "train_samples")
        return [f"LR schedule from the checkpoint (--use-checkpoint-opt_param-scheduler): {kept} (this run asked for "
                f"{'; '.join(changes)}); train_iters {t.train_iters} is where this run stops."]
    raise ConfigError(f"checkpoint {where} was trained with another LR schedule ({'; '.join(changes)}); pass "
                      "--override-opt_param-scheduler to use this run's values from the resumed iteration on, or "
                      "--use-checkpoint-opt_param-scheduler to keep the checkpoint's.")


def resume_vocab_size(cfg: Config, tokenizer) -> Optional[Tuple[int, str]]:
    """(model.vocab_size, tag folder) of the checkpoint training.load resumes, when it was trained with
    `tokenizer` (so a resumed run keeps its vocabulary); None without one. Errors locating it are left
    to find_resume."""
    if not cfg.training.load:
        return None
    try:
        found = locate_resume(cfg.training.load, cfg.training.save)
        if found is None:
            return None
        folder = os.path.join(found[0], found[1])
        meta = read_meta(folder)
    except (ConfigError, CheckpointError):
        return None
    saved = meta.get("tokenizer")
    vocab = ((meta.get("config") or {}).get("model") or {}).get("vocab_size")
    if not isinstance(saved, dict) or not isinstance(vocab, int) or not same_tokenizer(saved, tokenizer.describe()):
        return None
    return vocab, folder


def find_resume(cfg: Config, world: int, precision: Optional[str] = None) -> Optional[Resume]:
    """The checkpoint to resume from and how (Resume), after checking it fits; None = start fresh (no
    training.load, or an existing folder without checkpoints). May set cfg.training's schedule fields
    (training.use_checkpoint_opt_param_scheduler)."""
    load = cfg.training.load
    if not load:
        return None
    found = locate_resume(load, cfg.training.save)
    if found is None:
        return None
    save_dir, tag, how = found
    folder = os.path.join(save_dir, tag)
    try:
        meta = read_meta(folder)
    except CheckpointError as exc:
        raise ConfigError(f"training.load: {exc}") from None
    t = cfg.training
    if t.finetune:  # weights only (Megatron's --finetune): batch size, schedule and layout are this run's
        check_same_shape(meta, cfg, folder)
        check_same_tokenizer(meta, tokenizer_for(cfg), folder, untracked_means_gpt2=False)
        return Resume(tag, meta, "finetune", save_dir, how, same_layout=not layout_changes(meta, cfg, world, precision))
    if t.no_load_optim:  # weights + position: the data and schedule continue, DeepSpeed's shards are not read
        check_same_shape(meta, cfg, folder)
        check_same_tokenizer(meta, tokenizer_for(cfg), folder)
        check_global_batch(meta, cfg, folder, world)
        notes = resolve_schedule(meta, cfg, folder)
        return Resume(tag, meta, "weights", save_dir, how, tuple(notes),
                      same_layout=not layout_changes(meta, cfg, world, precision))
    mode = check_compatible(meta, cfg, folder, world, precision)
    notes = resolve_schedule(meta, cfg, folder)
    return Resume(tag, meta, mode, save_dir, how, tuple(notes),
                  same_layout=not layout_changes(meta, cfg, world, precision))


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
