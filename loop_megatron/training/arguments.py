"""Command-line arguments of `python -m loop_megatron.train`.

Flags use Megatron-LM's names where Megatron has the setting. The resolved config is built in this order:
preset (`--preset`), then a YAML/JSON file (`--config`), then the named flags, then `--override
section.field=value` items (last word wins). Only flags actually given change the config; the rest keep
the file's or preset's value.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Dict, List, Optional, Set, Tuple

from ..config import (CHECKPOINTING_KINDS, GATE_KINDS, INJECTION_KINDS, LOOP_SAMPLING_KINDS, PRECISIONS, PRESETS,
                      STATE_INIT_KINDS, Config, ConfigError, load_config, parse_override, set_field)

# (flag, config key, type, help). Types: int, float, str, "bool" (store_true), "list" (nargs+).
CONFIG_FLAGS: List[Tuple[str, str, object, str]] = [
    # data
    ("--data-path", "data.data_path", "list",
     "Indexed dataset prefix(es) without .bin/.idx, optionally weighted: 'PREFIX' or 'W1 PREFIX1 W2 PREFIX2 ...'."),
    ("--split", "data.split", str, "Train/valid/test proportions by document, e.g. '969,30,1'."),
    ("--seq-length", "data.seq_length", int, "Tokens per training sample."),
    ("--data-cache-path", "data.data_cache_path", str,
     "Folder for cached sample/shuffle indices (default: index_cache/ beside the data)."),
    ("--tokenizer-type", "data.tokenizer_type", str,
     "GPT2BPETokenizer (default, GPT-2's 50,257 tokens) or HuggingFaceTokenizer (with --tokenizer-model)."),
    ("--tokenizer-model", "data.tokenizer_model", str,
     "HuggingFaceTokenizer: a tokenizer.json or its folder (tools/train_tokenizer.py); set model.vocab_size to "
     "its vocabulary."),
    ("--valid-data-path", "data.valid_data_path", "list",
     "Named validation sets, each 'NAME=PREFIX' or 'PREFIX', reported separately (default: the valid split)."),
    ("--test-data-path", "data.test_data_path", "list",
     "Named test sets, as --valid-data-path (default: the test split)."),
    # model
    ("--num-layers", "model.num_layers", int, "Unique transformer blocks K in the shared loop stack."),
    ("--hidden-size", "model.hidden_size", int, "Width of the residual stream."),
    ("--num-attention-heads", "model.num_attention_heads", int, "Attention heads per block."),
    ("--loops", "model.num_loops", int, "Outer loop iterations N of the shared stack."),
    ("--inner-loops", "model.inner_loops", int, "Times each block is applied in place per outer iteration."),
    ("--loop-gates", "model.loop_gates", str, f"Per-iteration gate kind: one of {', '.join(GATE_KINDS)}."),
    ("--activation-checkpointing", "model.activation_checkpointing", str,
     f"Activation checkpointing (non-reentrant): one of {', '.join(CHECKPOINTING_KINDS)}."),
    ("--loop-injection", "model.loop_injection", str,
     f"How the prelude output re-enters each loop iteration: one of {', '.join(INJECTION_KINDS)}."),
    ("--loop-state-init", "model.loop_state_init", str,
     f"First loop state: one of {', '.join(STATE_INIT_KINDS)} (random: N(0, --loop-state-std^2) in training)."),
    ("--loop-state-std", "model.loop_state_std", float, "Standard deviation of the random first loop state."),
    ("--loop-gate-count", "model.loop_gate_count", int,
     "Gates the model owns (0 = --loops); set to --max-loops when the depth is sampled."),
    # parallel
    ("--tensor-model-parallel-size", "parallel.tensor_model_parallel_size", int,
     "Ranks that shard one model replica (Megatron TP); data-parallel size = world size / this."),
    # training
    ("--micro-batch-size", "training.micro_batch_size", int, "Samples per rank per forward/backward."),
    ("--global-batch-size", "training.global_batch_size", int,
     "Samples per optimizer step over all data-parallel ranks (= micro x accumulation x DP); "
     "0 = micro x DP."),
    ("--override-global-batch", "training.override_global_batch", "bool",
     "Resume a checkpoint made with another --global-batch-size, continuing from its consumed samples."),
    ("--train-iters", "training.train_iters", int, "Optimizer steps to train for (in total, counting resumed ones)."),
    ("--lr", "training.lr", float, "Peak learning rate."),
    ("--min-lr", "training.min_lr", float, "Learning rate at the end of the cosine decay."),
    ("--lr-warmup-iters", "training.lr_warmup_iters", int, "Linear warmup steps from 0 to --lr."),
    ("--lr-decay-iters", "training.lr_decay_iters", int,
     "Step at which the cosine decay reaches --min-lr (0 = --train-iters)."),
    ("--weight-decay", "training.weight_decay", float,
     "AdamW weight decay (not applied to biases, LayerNorm weights or loop gates)."),
    ("--clip-grad", "training.clip_grad", float, "Global gradient-norm clipping threshold (0 = off)."),
    ("--seed", "training.seed", int, "Seed for weights, data order and dropout."),
    ("--loop-sampling", "training.loop_sampling", str,
     f"Loop count per training step: one of {', '.join(LOOP_SAMPLING_KINDS)}."),
    ("--loop-sampling-per-sequence", "training.loop_sampling_per_sequence", "bool",
     "Sample one depth per sequence instead of per step."),
    ("--mean-loops", "training.mean_loops", float, "Mean sampled loop count (poisson-lognormal; 0 = --loops)."),
    ("--max-loops", "training.max_loops", int, "Cap on the sampled loop count (upper end of uniform)."),
    ("--backprop-loops", "training.backprop_loops", int,
     "Truncated backprop: gradient through the last k iterations only (0 = all)."),
    ("--loop-schedule", "training.loop_schedule", str,
     "Loop count (or mean) by training progress: '0:1,0.35:4' (steps) or 'linear:0:1,0.5:4' (ramp)."),
    ("--eval-loops", "training.eval_loops", int, "Loop count for evaluation (0 = the training mean)."),
    ("--zero-stage", "training.zero_stage", int, "DeepSpeed ZeRO stage: 0, 1, 2 or 3."),
    ("--cpu-offload", "training.cpu_offload", "bool",
     "Offload optimizer state to CPU with DeepSpeedCPUAdam (needs --zero-stage 1-3; JIT-builds cpu_adam once)."),
    ("--precision", "training.precision", str,
     f"One of {', '.join(PRECISIONS)}; auto = bf16 on a GPU that supports it, else fp32. fp16 is refused on CPU."),
    ("--deepspeed-config", "training.deepspeed_config", str,
     "DeepSpeed JSON to start from (e.g. ds_configs/zero2.json); batch sizes, clipping and precision are "
     "filled in from this run's settings and a file value that disagrees stops the run."),
    ("--save", "training.save", str, "Checkpoint folder (none = no checkpoints)."),
    ("--load", "training.load", str,
     "Checkpoint folder to resume from (its 'latest' tag); a folder without checkpoints starts fresh."),
    ("--init-from", "training.init_from", str,
     "Initialise weights from this checkpoint's model.pt (e.g. one imported with tools/convert_checkpoint.py "
     "--from-hf) and train from iteration 0 with a fresh optimizer; ignored when --load resumes a run."),
    ("--save-interval", "training.save_interval", int,
     "Save every N steps (0 = only at the end and on SIGTERM/SIGINT)."),
    ("--keep-last", "training.keep_last", int,
     "Complete checkpoints to keep; older ones are deleted after a newer one is complete (0 = keep all)."),
    ("--eval-interval", "training.eval_interval", int,
     "Evaluate on the valid split every N steps and at the end (0 = only at the end)."),
    ("--eval-iters", "training.eval_iters", int, "Micro-batches per rank per evaluation (0 = no evaluation)."),
    ("--log-interval", "training.log_interval", int, "Console progress line every N steps (rank 0)."),
    ("--tensorboard-dir", "training.tensorboard_dir", str, "TensorBoard folder (default <run-dir>/tensorboard)."),
    ("--run-dir", "training.run_dir", str,
     "Run folder for config.yaml, metrics.jsonl, summary.json (default runs/<preset or 'custom'>)."),
    ("--peak-tflops", "training.peak_tflops", float,
     "Peak TFLOP/s of one device for MFU (default: table for H100/H200/A100; no MFU on CPU)."),
    ("--compile", "training.compile", "bool",
     "torch.compile each transformer block (one graph reused by every loop); compile time is logged."),
]


@dataclasses.dataclass
class RunOptions:
    """Settings of one invocation that are not part of the model/training config."""

    preset: Optional[str] = None
    explicit: Set[str] = dataclasses.field(default_factory=set)
    """Config keys set on purpose (by the file, a flag or an override) rather than by preset/default."""
    debug_sleep_per_iter: float = 0.0
    local_rank: Optional[int] = None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loop_megatron.train",
        description="Train a Loop-Residual GPT with tensor parallelism and DeepSpeed ZeRO. Runs as a single "
                    "process without a launcher, or under `deepspeed` / `torchrun`. Settings come from "
                    "--preset, then --config FILE, then the flags below, then --override items; [section.field] "
                    "names the config field a flag sets. SIGTERM/SIGINT finish the current step, save a "
                    "checkpoint (with --save) and exit 0.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="Named starting configuration (model shape and data defaults).")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML or JSON file of {model, data, parallel, training} sections (may name a 'preset').")
    parser.add_argument("--override", metavar="SECTION.FIELD=VALUE", action="append", default=[],
                        help="Set any config field, e.g. model.hidden_dropout=0.1 (repeatable; applied last).")
    for flag, key, kind, help_text in CONFIG_FLAGS:
        dest = key.replace(".", "__")
        help_text = f"{help_text} [{key}]"
        if kind == "bool":
            parser.add_argument(flag, dest=dest, action="store_true", default=None, help=help_text)
        elif kind == "list":
            parser.add_argument(flag, dest=dest, nargs="+", default=None, metavar="PATH", help=help_text)
        else:
            metavar = {int: "N", float: "X"}.get(kind, key.split(".")[1].upper())
            parser.add_argument(flag, dest=dest, type=kind, default=None, metavar=metavar, help=help_text)
    parser.add_argument("--debug-sleep-per-iter", type=float, default=0.0, metavar="SECONDS",
                        help="Sleep this long after every step (testing aid: keeps a run alive long enough to "
                             "deliver a signal at a known step).")
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                        help="Set by the deepspeed/torch launchers; LOCAL_RANK in the environment is used instead "
                             "when present.")
    return parser


def _file_keys(path: Optional[str]) -> Set[str]:
    """The section.field keys a config file sets (for 'explicitly set' bookkeeping)."""
    if not path or not os.path.exists(path):
        return set()
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".json"):
                raw = json.load(f)
            else:
                import yaml

                raw = yaml.safe_load(f) or {}
    except Exception:
        return set()
    keys = set()
    if isinstance(raw, dict):
        for section, values in raw.items():
            if isinstance(values, dict):
                keys.update(f"{section}.{name.replace('-', '_')}" for name in values)
    return keys


def config_from_args(argv: Optional[List[str]] = None) -> Tuple[Config, RunOptions]:
    """Parse the command line into a resolved (not yet validated) Config and the run options."""
    args = build_parser().parse_args(argv)
    cfg = load_config(args.preset, args.config)
    explicit = _file_keys(args.config)
    for _, key, _, _ in CONFIG_FLAGS:
        value = getattr(args, key.replace(".", "__"))
        if value is not None:
            set_field(cfg, key, value, "command line")
            explicit.add(key)
    for item in args.override:
        key, value = parse_override(item)
        set_field(cfg, key, value, "--override")
        explicit.add(key)
    preset_name = args.preset
    if preset_name is None and args.config:
        # A config file may name its own preset.
        try:
            import yaml

            with open(args.config, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
            if isinstance(raw, dict) and isinstance(raw.get("preset"), str):
                preset_name = raw["preset"]
        except Exception:
            pass
    if not cfg.training.run_dir:
        cfg.training.run_dir = os.path.join("runs", preset_name or "custom")
    if args.debug_sleep_per_iter < 0:
        raise ConfigError(f"--debug-sleep-per-iter must be >= 0, got {args.debug_sleep_per_iter}.")
    opts = RunOptions(preset=preset_name, explicit=explicit, debug_sleep_per_iter=args.debug_sleep_per_iter,
                      local_rank=args.local_rank)
    return cfg, opts


def flag_table() -> Dict[str, str]:
    """flag -> config key (for docs)."""
    return {flag: key for flag, key, _, _ in CONFIG_FLAGS}
