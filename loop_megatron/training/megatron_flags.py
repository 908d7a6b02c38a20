"""Megatron-LM's (and Megatron-DeepSpeed's) spellings of settings this trainer has under another form.

Most Megatron names are plain trainer flags (arguments.CONFIG_FLAGS: `--hidden-dropout`,
`--adam-beta2`, ...). The flags here are the rest of a Megatron command line:

* `SPELLINGS`: a Megatron flag that sets one of our config fields with Megatron's values (`--bf16` is
  `training.precision=bf16`, `--attention-backend fused` is `model.attention_backend=sdpa`), or a
  spelling of one of our flags (`--deepspeed_config`), or a flag accepted because it holds here and
  changes nothing (`--deepspeed`: DeepSpeed is always on; `--pipeline-model-parallel-size 1`). Each is a
  real argparse option with its own `--help` line saying what it sets.
* `RECOMPUTE_FLAGS`: `--recompute-granularity`, `--recompute-method`, `--recompute-num-layers` and
  `--recompute-activations`, which together choose model.activation_checkpointing
  (`recompute_checkpointing`).
* `UNSUPPORTED`: Megatron flags known not to work here, each with the reason (and the flag to use
  instead where there is one); an unknown-flag error names it in one sentence.

`resolve(args, model_layers)` turns the parsed options into (config key, value, flag) settings; a value
Megatron allows but this trainer does not have is refused with one sentence naming the flag.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from ..config import ConfigError


@dataclasses.dataclass(frozen=True)
class Spelling:
    """One Megatron flag and what it sets here.

    kind: 'const' (takes no value: sets `key` to `const`), 'alias' (takes the value of our field `key`,
    typed like it), 'choice' (takes one of `values`: Megatron's value -> ours; a value in `refused` gets
    that sentence) or 'one' (an integer that must be 1: `refused` says why). `key` '' sets nothing.
    """

    flag: str
    kind: str
    key: str = ""
    const: Any = None
    values: Optional[Dict[str, str]] = None
    refused: Optional[Dict[str, str]] = None
    help: str = ""


SPELLINGS: List[Spelling] = [
    Spelling("--bf16", "const", "training.precision", "bf16",
             help="Megatron-LM: train in bf16 (sets training.precision=bf16, i.e. --precision bf16)."),
    Spelling("--fp16", "const", "training.precision", "fp16",
             help="Megatron-LM: train in fp16 with DeepSpeed's dynamic loss scaling (sets training.precision=fp16; "
                  "refused on CPU)."),
    Spelling("--use-flash-attn", "const", "model.attention_backend", "flash",
             help="Megatron-LM: use flash-attn (sets model.attention_backend=flash; needs a CUDA GPU, bf16/fp16 "
                  "and the flash-attn package, else PyTorch SDPA runs and the start-up line says so)."),
    Spelling("--attention-backend", "choice", "model.attention_backend",
             values={"auto": "auto", "flash": "flash", "fused": "sdpa", "sdpa": "sdpa"},
             refused=dict.fromkeys(("unfused", "local"), "this trainer has no unfused (explicit softmax(QK^T)V) "
                                   "attention; use auto, flash or fused (PyTorch SDPA's fused kernels)"),
             help="Megatron-LM's attention backend: auto, flash (flash-attn) or fused (PyTorch SDPA, which picks "
                  "fused kernels; also spelled sdpa); sets model.attention_backend. unfused and local are refused "
                  "(no explicit-softmax attention here)."),
    Spelling("--deepspeed", "const", "",
             help="Megatron-DeepSpeed: enable DeepSpeed. Accepted and changes nothing: this trainer always runs on "
                  "DeepSpeed."),
    Spelling("--deepspeed_config", "alias", "training.deepspeed_config",
             help="DeepSpeed's spelling of --deepspeed-config [training.deepspeed_config]."),
    Spelling("--pipeline-model-parallel-size", "one",
             refused={"": "this trainer has no pipeline parallelism (every rank holds all layers of its "
                          "tensor-parallel shard); use --tensor-model-parallel-size and ZeRO (--zero-stage) to "
                          "spread a model"},
             help="Megatron-LM: pipeline stages. Only 1 (no pipeline parallelism) is accepted."),
    Spelling("--distributed-backend", "choice", "", values={"nccl": "", "gloo": ""},
             help="Megatron-LM: the torch.distributed backend, nccl or gloo. Accepted and changes nothing: DeepSpeed "
                  "picks NCCL on GPUs and gloo on CPU."),
    Spelling("--use-mcore-models", "const", "",
             help="Megatron-LM: use Megatron-Core models. Accepted and changes nothing (the model is "
                  "loop_megatron's own)."),
    Spelling("--no-masked-softmax-fusion", "const", "",
             help="Megatron-LM kernel-fusion switch. Accepted and changes nothing (no such fused kernel here)."),
    Spelling("--no-bias-gelu-fusion", "const", "",
             help="Megatron-LM kernel-fusion switch. Accepted and changes nothing (no such fused kernel here)."),
    Spelling("--no-bias-dropout-fusion", "const", "",
             help="Megatron-LM kernel-fusion switch. Accepted and changes nothing (no such fused kernel here)."),
    Spelling("--no-gradient-accumulation-fusion", "const", "",
             help="Megatron-LM kernel-fusion switch. Accepted and changes nothing (no such fused kernel here)."),
]

RECOMPUTE_FLAGS: Dict[str, str] = {
    "--recompute-activations": "Megatron-LM: the same as --recompute-granularity selective.",
    "--recompute-granularity": "Megatron-LM: full (recompute whole blocks; with --recompute-method: "
                               "model.activation_checkpointing per-block or per-iteration) or selective "
                               "(Megatron recomputes only core attention, to drop its s x s attention "
                               "probabilities; attention here runs in flash-attn or PyTorch SDPA, whose fused GPU "
                               "kernels never store them, so it sets model.activation_checkpointing=none).",
    "--recompute-method": "Megatron-LM, with --recompute-granularity full: uniform (checkpoint groups of "
                          "--recompute-num-layers blocks: 1 = per-block, model.num_layers = per-iteration, one "
                          "checkpoint around the shared stack per loop iteration) or block (checkpoint the first "
                          "--recompute-num-layers blocks: accepted when that is all of them = per-block). Default "
                          "uniform.",
    "--recompute-num-layers": "Megatron-LM: blocks per checkpoint (uniform) or checkpointed blocks (block); "
                              "default 1 (uniform) or model.num_layers (block).",
}

_NO_PIPELINE = "this trainer has no pipeline parallelism; use --tensor-model-parallel-size and --zero-stage"
_GPT2_SHAPE = ("the model is GPT-2's block (LayerNorm, GELU MLP, learned absolute positions, tied embeddings, "
               "biases, multi-head attention), which is what exports as a Hugging Face GPT2LMHeadModel")

UNSUPPORTED: Dict[str, str] = {
    "--context-parallel-size": "context parallelism is not implemented; sequences are split only by "
                               "--tensor-model-parallel-size's head sharding",
    "--virtual-pipeline-model-parallel-size": _NO_PIPELINE,
    "--num-layers-per-virtual-pipeline-stage": _NO_PIPELINE,
    "--rampup-batch-size": "batch-size ramp-up is not implemented: the global batch is fixed by "
                           "--global-batch-size (--override-global-batch changes it between runs on resume)",
    "--step-batch-size-schedule": "batch-size ramp-up is not implemented: the global batch is fixed by "
                                  "--global-batch-size (--override-global-batch changes it between runs on resume)",
    "--use-distributed-optimizer": "Megatron's distributed optimizer shards optimizer state over data-parallel "
                                   "ranks, which is DeepSpeed ZeRO here: use --zero-stage 1 (or 2/3)",
    "--overlap-grad-reduce": "gradient all-reduce overlap is DeepSpeed's: set zero_optimization.overlap_comm in "
                             "the --deepspeed-config file",
    "--overlap-param-gather": "parameter all-gather overlap is DeepSpeed's: set zero_optimization.overlap_comm in "
                              "the --deepspeed-config file",
    "--num-experts": "mixture-of-experts layers are not implemented (the MLP is dense)",
    "--expert-model-parallel-size": "mixture-of-experts layers are not implemented (the MLP is dense)",
    "--swiglu": _GPT2_SHAPE,
    "--normalization": _GPT2_SHAPE,
    "--position-embedding-type": _GPT2_SHAPE,
    "--use-rotary-position-embeddings": _GPT2_SHAPE,
    "--untie-embeddings-and-output-weights": _GPT2_SHAPE,
    "--disable-bias-linear": _GPT2_SHAPE,
    "--group-query-attention": _GPT2_SHAPE,
    "--num-query-groups": _GPT2_SHAPE,
    "--wandb-entity": "set the W&B entity with the WANDB_ENTITY environment variable, which wandb reads",
    "--transformer-impl": "there is one transformer implementation (loop_megatron's; no Transformer Engine)",
    "--fp8-format": "fp8 training is not implemented; use --bf16",
    "--tokenizer-model-type": "GPT2BPETokenizer (--vocab-file/--merge-file) and HuggingFaceTokenizer "
                              "(--tokenizer-model) are the tokenizers here",
    "--checkpoint-activations": "Megatron-LM renamed it: use --recompute-activations or --recompute-granularity",
}
"""Megatron flag -> why it does not work here (the end of a one-sentence error)."""


def dest(flag: str) -> str:
    """The argparse dest of a Megatron spelling (kept apart from the config-field dests)."""
    return "megatron__" + flag.lstrip("-").replace("-", "_")


def add_arguments(parser, field_kind, field_help) -> None:
    """Add SPELLINGS and RECOMPUTE_FLAGS to the trainer's parser (after its own flags)."""
    group = parser.add_argument_group("Megatron-LM spellings", "Megatron-LM / Megatron-DeepSpeed flags for settings "
                                      "the flags above hold under another name or form.")
    for s in SPELLINGS:
        if s.kind == "const":
            group.add_argument(s.flag, dest=dest(s.flag), action="store_true", default=None, help=s.help)
        elif s.kind == "alias":
            kind = field_kind(s.key)
            group.add_argument(s.flag, dest=dest(s.flag), type=kind, default=None,
                               metavar=s.key.split(".")[1].upper(), help=f"{s.help} {field_help(s.key)}")
        elif s.kind == "choice":
            group.add_argument(s.flag, dest=dest(s.flag), default=None,
                               metavar="{" + ",".join(list(s.values) + list(s.refused or {})) + "}", help=s.help)
        else:
            group.add_argument(s.flag, dest=dest(s.flag), type=int, default=None, metavar="N", help=s.help)
    group.add_argument("--recompute-activations", dest=dest("--recompute-activations"), action="store_true",
                       default=None, help=RECOMPUTE_FLAGS["--recompute-activations"])
    group.add_argument("--recompute-granularity", dest=dest("--recompute-granularity"), default=None,
                       metavar="{full,selective}", help=RECOMPUTE_FLAGS["--recompute-granularity"])
    group.add_argument("--recompute-method", dest=dest("--recompute-method"), default=None,
                       metavar="{uniform,block}", help=RECOMPUTE_FLAGS["--recompute-method"])
    group.add_argument("--recompute-num-layers", dest=dest("--recompute-num-layers"), type=int, default=None,
                       metavar="N", help=RECOMPUTE_FLAGS["--recompute-num-layers"])


def recompute_checkpointing(granularity: Optional[str], method: Optional[str], num_layers: Optional[int],
                            model_layers: int) -> Optional[str]:
    """model.activation_checkpointing for Megatron's recompute flags (None: none of them given). Raises
    ConfigError naming the flag for a combination this trainer has no form of."""
    if granularity is None:
        for flag, value in (("--recompute-method", method), ("--recompute-num-layers", num_layers)):
            if value is not None:
                raise ConfigError(f"{flag} needs --recompute-granularity full (as in Megatron-LM).")
        return None
    if granularity not in ("full", "selective"):
        raise ConfigError(f"--recompute-granularity must be full or selective, got '{granularity}'.")
    if granularity == "selective":
        if method is not None:
            raise ConfigError("--recompute-method applies to --recompute-granularity full only, not selective "
                              "(as in Megatron-LM).")
        return "none"
    method = method or "uniform"
    if method not in ("uniform", "block"):
        raise ConfigError(f"--recompute-method must be uniform or block, got '{method}'.")
    n = num_layers if num_layers is not None else (1 if method == "uniform" else model_layers)
    if method == "uniform":
        if n == 1:
            return "per-block"
        if n == model_layers:
            return "per-iteration"
        raise ConfigError(f"--recompute-num-layers {n} with --recompute-method uniform: this trainer checkpoints "
                          f"1 block at a time (per-block) or the whole shared stack of {model_layers} "
                          f"(model.num_layers) per loop iteration (per-iteration); use 1 or {model_layers}.")
    if n >= model_layers:
        return "per-block"
    raise ConfigError(f"--recompute-num-layers {n} with --recompute-method block (checkpoint only the first {n} "
                      f"of {model_layers} blocks) is not available here: every block or none is checkpointed; "
                      f"use --recompute-num-layers {model_layers} or --recompute-method uniform.")


def resolve(args, model_layers) -> List[Tuple[str, Any, str]]:
    """(config key, value, flag) for every Megatron spelling on the parsed command line. `model_layers`:
    a function giving model.num_layers once every other setting is applied (the recompute flags need it)."""
    out: List[Tuple[str, Any, str]] = []
    for s in SPELLINGS:
        value = getattr(args, dest(s.flag))
        if value is None:
            continue
        if s.kind == "const":
            if s.key:
                out.append((s.key, s.const, s.flag))
        elif s.kind == "alias":
            out.append((s.key, value, s.flag))
        elif s.kind == "choice":
            if value in (s.refused or {}):
                raise ConfigError(f"{s.flag} {value}: {s.refused[value]}.")
            if value not in s.values:
                raise ConfigError(f"{s.flag} must be one of {', '.join(s.values)}, got '{value}'.")
            if s.key:
                out.append((s.key, s.values[value], s.flag))
        elif value != 1:
            raise ConfigError(f"{s.flag} {value}: {s.refused['']}.")
    granularity = getattr(args, dest("--recompute-granularity"))
    named = "--recompute-granularity" if granularity is not None else "--recompute-method"
    if getattr(args, dest("--recompute-activations")):
        named = "--recompute-activations" if granularity is None else named
        if granularity not in (None, "selective"):
            raise ConfigError(f"--recompute-activations means --recompute-granularity selective, but "
                              f"--recompute-granularity {granularity} was also given; keep one.")
        granularity = "selective"
    method, layers = getattr(args, dest("--recompute-method")), getattr(args, dest("--recompute-num-layers"))
    if granularity is not None or method is not None or layers is not None:
        kind = recompute_checkpointing(granularity, method, layers, model_layers())
        out.append(("model.activation_checkpointing", kind, named))
    return out


def unsupported_message(flag: str) -> Optional[str]:
    """The one-sentence refusal of a known-but-unsupported Megatron flag, or None."""
    reason = UNSUPPORTED.get(flag)
    return None if reason is None else f"{flag} (Megatron-LM) is not supported here: {reason}."
