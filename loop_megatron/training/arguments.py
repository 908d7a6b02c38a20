"""Command-line arguments of `python -m loop_megatron.train`.

The flags are generated from the config: `CONFIG_FLAGS` names the flag of each config field that has one
(Megatron-LM's names where Megatron has the setting); the type, metavar and help text come from the field
itself (its default's type and the docstring under it in loop_megatron/config.py), so help text exists
once. Every other field is reachable with `--override section.field=value`.

Megatron-LM spellings that are not a plain (flag, field) pair (`--bf16`, `--recompute-granularity`,
`--deepspeed`, `--pipeline-model-parallel-size 1`, ...) and the table of Megatron flags refused with a
reason live in training/megatron_flags.py; they are options of the same parser (one --help). A spelling
and a named flag that set one field to different values are refused.

The resolved config is built in this order: preset (`--preset`, or the file's own `preset:`), then a
YAML/JSON file (`--config`, read once), then the named flags, then `--override` items (last word wins).
Only flags actually given change the config; the rest keep the file's or preset's value.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from typing import Any, Dict, List, Optional, Set, Tuple

from . import megatron_flags
from ..config import (PRESETS, SECTIONS, Config, ConfigError, compose_config, field_docs, file_keys,
                      file_preset_name, parse_override, read_config_file, resolve_lr_horizons, run_folder, set_field)

# (flag, config key): the trainer's named flags, in --help order. Type, metavar and help come from the field.
CONFIG_FLAGS: List[Tuple[str, str]] = [
    # data
    ("--data-path", "data.data_path"),
    ("--split", "data.split"),
    ("--seq-length", "data.seq_length"),
    ("--reset-position-ids", "data.reset_position_ids"),
    ("--reset-attention-mask", "data.reset_attention_mask"),
    ("--eod-mask-loss", "data.eod_mask_loss"),
    ("--data-cache-path", "data.data_cache_path"),
    ("--tokenizer-type", "data.tokenizer_type"),
    ("--tokenizer-model", "data.tokenizer_model"),
    ("--vocab-file", "data.vocab_file"),
    ("--merge-file", "data.merge_file"),
    ("--num-workers", "data.num_workers"),
    ("--valid-data-path", "data.valid_data_path"),
    ("--test-data-path", "data.test_data_path"),
    # model
    ("--num-layers", "model.num_layers"),
    ("--hidden-size", "model.hidden_size"),
    ("--num-attention-heads", "model.num_attention_heads"),
    ("--ffn-hidden-size", "model.ffn_hidden_size"),
    ("--max-position-embeddings", "model.max_position_embeddings"),
    ("--vocab-size", "model.vocab_size"),
    ("--make-vocab-size-divisible-by", "model.make_vocab_size_divisible_by"),
    ("--init-method-std", "model.init_method_std"),
    ("--hidden-dropout", "model.hidden_dropout"),
    ("--attention-dropout", "model.attention_dropout"),
    ("--loops", "model.num_loops"),
    ("--inner-loops", "model.inner_loops"),
    ("--loop-gates", "model.loop_gates"),
    ("--activation-checkpointing", "model.activation_checkpointing"),
    ("--loop-injection", "model.loop_injection"),
    ("--loop-state-init", "model.loop_state_init"),
    ("--loop-state-std", "model.loop_state_std"),
    ("--loop-gate-count", "model.loop_gate_count"),
    # parallel
    ("--tensor-model-parallel-size", "parallel.tensor_model_parallel_size"),
    ("--sequence-parallel", "parallel.sequence_parallel"),
    ("--distributed-timeout-minutes", "parallel.distributed_timeout_minutes"),
    # training
    ("--micro-batch-size", "training.micro_batch_size"),
    ("--global-batch-size", "training.global_batch_size"),
    ("--override-global-batch", "training.override_global_batch"),
    ("--override-opt_param-scheduler", "training.override_opt_param_scheduler"),
    ("--use-checkpoint-opt_param-scheduler", "training.use_checkpoint_opt_param_scheduler"),
    ("--train-iters", "training.train_iters"),
    ("--lr", "training.lr"),
    ("--min-lr", "training.min_lr"),
    ("--lr-warmup-iters", "training.lr_warmup_iters"),
    ("--lr-decay-iters", "training.lr_decay_iters"),
    ("--weight-decay", "training.weight_decay"),
    ("--adam-beta1", "training.adam_beta1"),
    ("--adam-beta2", "training.adam_beta2"),
    ("--adam-eps", "training.adam_eps"),
    ("--clip-grad", "training.clip_grad"),
    ("--skip-nonfinite-steps", "training.skip_nonfinite_steps"),
    ("--max-skipped-steps", "training.max_skipped_steps"),
    ("--seed", "training.seed"),
    ("--loop-sampling", "training.loop_sampling"),
    ("--loop-sampling-per-sequence", "training.loop_sampling_per_sequence"),
    ("--mean-loops", "training.mean_loops"),
    ("--max-loops", "training.max_loops"),
    ("--backprop-loops", "training.backprop_loops"),
    ("--loop-schedule", "training.loop_schedule"),
    ("--eval-loops", "training.eval_loops"),
    ("--zero-stage", "training.zero_stage"),
    ("--cpu-offload", "training.cpu_offload"),
    ("--precision", "training.precision"),
    ("--deepspeed-config", "training.deepspeed_config"),
    ("--save", "training.save"),
    ("--force-save-lock", "training.force_save_lock"),
    ("--load", "training.load"),
    ("--init-from", "training.init_from"),
    ("--save-interval", "training.save_interval"),
    ("--keep-last", "training.keep_last"),
    ("--async-save", "training.async_save"),
    ("--eval-interval", "training.eval_interval"),
    ("--eval-iters", "training.eval_iters"),
    ("--log-interval", "training.log_interval"),
    ("--tensorboard-dir", "training.tensorboard_dir"),
    ("--wandb-project", "training.wandb_project"),
    ("--wandb-exp-name", "training.wandb_exp_name"),
    ("--wandb-save-dir", "training.wandb_save_dir"),
    ("--run-dir", "training.run_dir"),
    ("--peak-tflops", "training.peak_tflops"),
    ("--compile", "training.compile"),
    # Megatron-LM's LR schedules, sample-based horizons, planned exits and partial loading (issue 24)
    ("--lr-decay-style", "training.lr_decay_style"),
    ("--lr-wsd-decay-style", "training.lr_wsd_decay_style"),
    ("--lr-wsd-decay-iters", "training.lr_wsd_decay_iters"),
    ("--lr-wsd-decay-samples", "training.lr_wsd_decay_samples"),
    ("--lr-warmup-fraction", "training.lr_warmup_fraction"),
    ("--lr-warmup-init", "training.lr_warmup_init"),
    ("--lr-warmup-samples", "training.lr_warmup_samples"),
    ("--lr-decay-samples", "training.lr_decay_samples"),
    ("--train-samples", "training.train_samples"),
    ("--exit-interval", "training.exit_interval"),
    ("--exit-duration-in-mins", "training.exit_duration_in_mins"),
    ("--exit-signal-handler", "training.exit_signal_handler"),
    ("--no-load-optim", "training.no_load_optim"),
    ("--no-load-rng", "training.no_load_rng"),
    ("--finetune", "training.finetune"),
]


def field_kind(key: str) -> Any:
    """The flag type of config field `section.field`: int, float, str, "bool" (store_true) or "list"
    (nargs='+'), read from the dataclass field's annotation."""
    section, name = key.split(".", 1)
    cls = SECTIONS[section]
    hint = typing.get_type_hints(cls)[name]
    if hint is bool:
        return "bool"
    if typing.get_origin(hint) in (list, List):
        return "list"
    if hint in (int, float, str):
        return hint
    raise TypeError(f"{key}: no command-line type for {hint!r}")


def field_help(key: str) -> str:
    """The docstring of config field `section.field`, on one line (argparse-escaped)."""
    section, name = key.split(".", 1)
    return " ".join(field_docs(SECTIONS[section]).get(name, "").split()).replace("%", "%%")


@dataclasses.dataclass
class RunOptions:
    """Settings of one invocation that are not part of the model/training config."""

    preset: Optional[str] = None
    explicit: Set[str] = dataclasses.field(default_factory=set)
    """Config keys set on purpose (by the file, a flag or an override) rather than by preset/default."""
    debug_sleep_per_iter: float = 0.0
    debug_slow_save: float = 0.0
    """A testing aid: seconds a background checkpoint write (--async-save) sleeps before each file."""
    local_rank: Optional[int] = None
    notes: List[str] = dataclasses.field(default_factory=list)
    """Lines the trainer logs at start: values the command line's settings displaced (resolve_lr_horizons)."""


PROG = "python -m loop_megatron.train"


class TrainerArgumentParser(argparse.ArgumentParser):
    """argparse without prefix abbreviations (`--hidden 64` is not `--hidden-size 64`) whose errors are
    ConfigErrors: one sentence, printed once by the CLI, instead of every rank's usage text."""

    def error(self, message: str):
        raise ConfigError(f"{message} ({self.prog} --help lists the flags).")


def _config_keys() -> List[str]:
    return [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def suggest_flag(name: str, parser: argparse.ArgumentParser) -> str:
    """What an unknown `--name` might have meant: the config field it spells (its flag, or the --override
    item when the field has no flag), else the nearest flag (difflib), else the nearest field name."""
    flags = sorted({o for a in parser._actions for o in a.option_strings if o.startswith("--")})
    by_key = {key: flag for flag, key in CONFIG_FLAGS}
    keys = _config_keys()

    def field_hint(key: str) -> str:
        if key in by_key:
            return f"; did you mean {by_key[key]} (sets {key})?"
        return f"; {key} has no flag of its own: use --override {key}=VALUE"

    stem = name.lstrip("-").replace("-", "_")
    spelled = [k for k in keys if stem in (k.split(".")[1], k.replace(".", "_"))]
    if spelled:
        return field_hint(sorted(spelled, key=lambda k: k not in by_key)[0])
    close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]}?"
    close = difflib.get_close_matches(stem, [k.split(".")[1] for k in keys], n=1, cutoff=0.75)
    if close:
        return field_hint(next(k for k in keys if k.split(".")[1] == close[0]))
    return f" ({PROG} --help lists the flags; --override section.field=VALUE sets any config field)"


def unknown_arguments_message(unknown: List[str], parser: argparse.ArgumentParser) -> str:
    """One sentence about the first thing on the command line that is not a trainer flag."""
    flag = next((u for u in unknown if u.startswith("-")), None)
    if flag is None:
        return (f"unexpected argument {unknown[0]!r}: settings are --flag VALUE pairs ({PROG} --help lists "
                f"the flags).")
    name = flag.split("=", 1)[0]
    refusal = megatron_flags.unsupported_message(name)
    if refusal:
        return refusal
    hint = suggest_flag(name, parser)
    return f"unknown flag {name}{hint}" + ("" if hint.endswith("?") else ".")


def build_parser() -> argparse.ArgumentParser:
    parser = TrainerArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Train a Loop-Residual GPT with tensor parallelism and DeepSpeed ZeRO. Runs as a single "
                    "process without a launcher, or under `deepspeed` / `torchrun`. Settings come from "
                    "--preset, then --config FILE, then the flags below, then --override items; [section.field] "
                    "names the config field a flag sets. SIGTERM/SIGINT finish the current step, save a "
                    "checkpoint (with --save) and exit 0.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="Named recipe: model, data, parallel and training settings (loop_megatron/config.py "
                             "PRESETS; flags and --override change any of them).")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML or JSON file of {model, data, parallel, training} sections (may name a 'preset').")
    parser.add_argument("--override", metavar="SECTION.FIELD=VALUE", action="append", default=[],
                        help="Set any config field, e.g. model.hidden_dropout=0.1 (repeatable; applied last).")
    for flag, key in CONFIG_FLAGS:
        dest, kind = key.replace(".", "__"), field_kind(key)
        help_text = f"{field_help(key)} [{key}]"
        if kind == "bool":
            parser.add_argument(flag, dest=dest, action="store_true", default=None, help=help_text)
        elif kind == "list":
            parser.add_argument(flag, dest=dest, nargs="+", default=None, metavar="PATH", help=help_text)
        else:
            metavar = {int: "N", float: "X"}.get(kind, key.split(".")[1].upper())
            parser.add_argument(flag, dest=dest, type=kind, default=None, metavar=metavar, help=help_text)
    megatron_flags.add_arguments(parser, field_kind, field_help)
    parser.add_argument("--debug-sleep-per-iter", type=float, default=0.0, metavar="SECONDS",
                        help="Make every step this much longer (a sleep before the step's all-reduce; testing aid: "
                             "a signal sent after step N is logged lands inside step N+1).")
    parser.add_argument("--debug-slow-save", type=float, default=0.0, metavar="SECONDS",
                        help="Make a background checkpoint write (--async-save) sleep this long before each file "
                             "(testing aid: a process can be killed in the middle of one).")
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                        help="Set by the deepspeed/torch launchers; LOCAL_RANK in the environment is used instead "
                             "when present.")
    return parser


def config_from_args(argv: Optional[List[str]] = None) -> Tuple[Config, RunOptions]:
    """Parse the command line into a resolved (not yet validated) Config and the run options."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(unknown_arguments_message(unknown, parser))
    raw = read_config_file(args.config) if args.config else None
    preset_name = args.preset or file_preset_name(raw)
    cfg = compose_config(preset_name, raw, args.config or "config")
    explicit = set(file_keys(raw))
    given: Dict[str, Tuple[Any, str]] = {}  # key -> (value, flag) of the named flags and Megatron spellings
    for flag, key in CONFIG_FLAGS:
        value = getattr(args, key.replace(".", "__"))
        if value is not None:
            set_field(cfg, key, value, "command line")
            given[key] = (getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]), flag)
            explicit.add(key)
    for key, value, flag in megatron_flags.resolve(args, lambda: cfg.model.num_layers):
        set_field(cfg, key, value, flag)
        value = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
        if key in given and given[key][0] != value:
            raise ConfigError(f"{flag} sets {key}={value} but {given[key][1]} sets it to {given[key][0]}; "
                              f"give only one of them.")
        given[key] = (value, flag)
        explicit.add(key)
    for item in args.override:
        key, value = parse_override(item)
        set_field(cfg, key, value, "--override")
        explicit.add(key)
    cfg.training.run_dir = run_folder(cfg, preset_name if isinstance(preset_name, str) else None)
    if args.debug_sleep_per_iter < 0:
        raise ConfigError(f"--debug-sleep-per-iter must be >= 0, got {args.debug_sleep_per_iter}.")
    if args.debug_slow_save < 0:
        raise ConfigError(f"--debug-slow-save must be >= 0, got {args.debug_slow_save}.")
    notes = resolve_lr_horizons(cfg, explicit)  # e.g. a preset's lr_warmup_iters under --train-samples
    opts = RunOptions(preset=preset_name, explicit=explicit, debug_sleep_per_iter=args.debug_sleep_per_iter,
                      debug_slow_save=args.debug_slow_save, local_rank=args.local_rank, notes=notes)
    return cfg, opts


def flag_table() -> Dict[str, str]:
    """flag -> config key (for docs)."""
    return dict(CONFIG_FLAGS)
