#!/usr/bin/env python
"""Per-GPU memory of a looped model's training layouts, on paper: pick TP, sequence parallelism and ZeRO.

    python tools/memory_plan.py                        # the 1B and 7B looped models on 8-64 GPUs
    python tools/memory_plan.py --preset loop-81m --gpus 8 16 --seq-length 1024 --micro-batch-size 8
    python tools/memory_plan.py --model loop-7b --gpu-memory 40

Each cell is model states + activations in GiB per GPU (bf16 training, one micro-batch, flash attention
unless --no-flash; loop_megatron/launch/memory.py says what is counted and the formulas); a cell in
parentheses does not fit --gpu-memory. Under each table, the layout to pick for each GPU count: the one
that fits with the least tensor parallelism (TP costs communication inside every block), then the lower
ZeRO stage (ZeRO-3 gathers the weights every step), then with sequence parallelism where TP > 1 (it
replaces each all-reduce by a reduce-scatter and an all-gather of the same volume, so it saves
activation memory at no extra communication). Not counted:
the allocator's fragmentation, communication buffers, CUDA context (~1-3 GiB), pipeline parallelism
(which the trainer does not have).
"""
import argparse
import sys
from typing import Dict, List, Tuple

import _bootstrap  # noqa: F401  (repo root on sys.path)

from loop_megatron.config import PRESETS, Config, load_config, set_field
from loop_megatron.errors import LoopMegatronError
from loop_megatron.launch.memory import loop_parameters, per_gpu_memory
from loop_megatron.model.stats import parameter_count

GIB = 2 ** 30
# Looped models at the scales ZeRO-3 and TP are for, built on the recurrent-depth recipe
# (recurrent-97m: prelude / core / coda, linear injection, sampled depth, truncated backprop of 4
# iterations), per-iteration activation checkpointing, GPT-2 vocabulary, context 2048.
MODELS: Dict[str, Tuple[str, Dict[str, object]]] = {
    "loop-1b": ("recurrent-97m", {"model.hidden_size": 3072, "model.num_attention_heads": 24,
                                  "model.prelude_layers": 2, "model.num_layers": 4, "model.coda_layers": 2,
                                  "model.num_loops": 8, "model.max_position_embeddings": 2048,
                                  "model.activation_checkpointing": "per-iteration", "data.seq_length": 2048}),
    "loop-7b": ("recurrent-97m", {"model.hidden_size": 5120, "model.num_attention_heads": 40,
                                  "model.prelude_layers": 2, "model.num_layers": 16, "model.coda_layers": 2,
                                  "model.num_loops": 8, "model.max_position_embeddings": 2048,
                                  "model.activation_checkpointing": "per-iteration", "data.seq_length": 2048}),
}
LAYOUTS: List[Tuple[int, bool, int]] = [(tp, sp, zero) for tp in (1, 2, 4, 8) for sp in ((False,) if tp == 1 else
                                                                                      (False, True))
                                        for zero in (1, 2, 3)]


def named_model(name: str) -> Config:
    base, overrides = MODELS[name]
    cfg = load_config(base)
    for key, value in overrides.items():
        set_field(cfg, key, value, f"tools/memory_plan.py {name}")
    return cfg


def plan(cfg: Config, gpus: List[int], seq: int, micro: int, flash: bool) -> Dict[Tuple[int, bool, int], Dict]:
    """{(tp, sp, zero): {gpus: per_gpu_memory}} for the layouts whose TP size divides the GPU count and the
    attention heads."""
    m = cfg.model
    out = {}
    for tp, sp, zero in LAYOUTS:
        if m.num_attention_heads % tp:
            continue
        out[(tp, sp, zero)] = {n: per_gpu_memory(m, seq, micro, n, tp, sp, zero, cfg.training.backprop_loops, flash)
                               for n in gpus if n % tp == 0}
    return out


def pick(rows, n: int, budget: float):
    """The layout to pick on n GPUs (see the module docstring), or None when none fits."""
    fits = [(tp, zero, not sp) for (tp, sp, zero), cells in rows.items() if n in cells and cells[n]["total"] <= budget]
    if not fits:
        return None
    tp, zero, no_sp = min(fits)
    return tp, not no_sp, zero


def layout_name(tp: int, sp: bool, zero: int) -> str:
    return f"TP {tp}{' + SP' if sp else ''}, ZeRO-{zero}"


def print_table(title: str, cfg: Config, gpus: List[int], seq: int, micro: int, flash: bool, budget_gib: float) -> None:
    m = cfg.model
    rows = plan(cfg, gpus, seq, micro, flash)
    print(f"\n### {title}: {parameter_count(m) / 1e9:.2f}B parameters ({loop_parameters(m) / 1e9:.2f}B in the "
          f"loop), {m.prelude_layers} + {m.num_layers} x {m.num_loops} + {m.coda_layers} blocks (effective depth "
          f"{m.effective_depth}), d={m.hidden_size}, seq {seq}, micro-batch {micro}, checkpointing "
          f"{m.activation_checkpointing}, backprop through {cfg.training.backprop_loops or m.num_loops} iterations, "
          f"{'flash' if flash else 'unfused'} attention; GiB per GPU (states + activations), "
          f"(..) = over {budget_gib:g} GiB\n")
    print("| layout | " + " | ".join(f"{n} GPUs" for n in gpus) + " |")
    print("|---|" + "---:|" * len(gpus))
    budget = budget_gib * GIB
    for (tp, sp, zero), cells in rows.items():
        out = []
        for n in gpus:
            if n not in cells:
                out.append("–")
                continue
            c = cells[n]
            text = f"{c['states'] / GIB:.1f} + {c['activations'] / GIB:.1f}"
            out.append(text if c["total"] <= budget else f"({text})")
        print(f"| {layout_name(tp, sp, zero)} | " + " | ".join(out) + " |")
    picks = []
    for n in gpus:
        choice = pick(rows, n, budget)
        picks.append(f"{n} GPUs: {layout_name(*choice) if choice else 'nothing fits (lower the micro-batch)'}")
    print("\nPick: " + "; ".join(picks) + ".")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), action="append",
                        help="a built-in looped model (repeatable; default: all)")
    parser.add_argument("--preset", help=f"plan a preset instead (one of: {', '.join(PRESETS)})")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="change one config field of --preset (repeatable)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64], help="GPU counts (columns)")
    parser.add_argument("--seq-length", type=int, help="sequence length (default: the model's data.seq_length)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="sequences per GPU per micro-step")
    parser.add_argument("--gpu-memory", type=float, default=80, help="GiB per GPU a layout must fit in")
    parser.add_argument("--no-flash", action="store_true", help="count the attention scores (no flash attention)")
    args = parser.parse_args(argv)
    try:
        if args.preset:
            models = [(args.preset, load_config(args.preset, None, args.override))]
        else:
            models = [(name, named_model(name)) for name in (args.model or sorted(MODELS))]
        for title, cfg in models:
            cfg.validate()
            print_table(title, cfg, args.gpus, args.seq_length or cfg.data.seq_length, args.micro_batch_size,
                        not args.no_flash, args.gpu_memory)
    except (LoopMegatronError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
