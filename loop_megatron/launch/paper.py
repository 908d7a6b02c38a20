"""The paper's five GPT-2-small-width runs: their settings, batch sizes, trainer flags and the size table.

`launch/run_paper_experiments.sh` (through `cli.main_paper`) prints this plan with `--dry-run` and runs it
otherwise; every hyper-parameter can be changed through the environment variable named in
`PaperSettings.ENV`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import LaunchError
from .memory import largest_layer_params, zero_model_state_bytes

PAPER_PRESETS = ("gpt2-124m", "loop-81m", "loop-67m", "lite-45m", "loop-45m")


@dataclass
class PaperSettings:
    """Hyper-parameters of the paper-scale runs (nanoGPT's GPT-2-small recipe on OpenWebText).

    Every field can be changed through the environment variable named in `ENV` (see run_paper_experiments.sh).
    """

    data_path: str = "data/openwebtext/openwebtext_text_document"
    seq_length: int = 1024
    micro_batch_size: int = 12
    global_batch_size: int = 0
    """0 = the multiple of micro x data-parallel size in nanoGPT's 480..512 sequences (~0.5M tokens)."""
    train_iters: int = 600000
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_iters: int = 2000
    zero_stage: int = 1
    precision: str = "bf16"
    activation_checkpointing: str = "none"
    save_root: str = "checkpoints/paper"
    run_root: str = "runs/paper"
    save_interval: int = 5000
    eval_interval: int = 1000
    eval_iters: int = 100
    log_interval: int = 10

    ENV = {"data_path": "OWT_DATA", "seq_length": "SEQ_LENGTH", "micro_batch_size": "MICRO_BATCH",
           "global_batch_size": "GLOBAL_BATCH", "train_iters": "TRAIN_ITERS", "lr": "LR", "min_lr": "MIN_LR",
           "warmup_iters": "WARMUP_ITERS", "zero_stage": "ZERO_STAGE", "precision": "PRECISION",
           "activation_checkpointing": "ACT_CKPT", "save_root": "SAVE_ROOT", "run_root": "RUN_ROOT",
           "save_interval": "SAVE_INTERVAL", "eval_interval": "EVAL_INTERVAL", "eval_iters": "EVAL_ITERS",
           "log_interval": "LOG_INTERVAL"}

    @classmethod
    def from_env(cls, environ: Optional[Dict[str, str]] = None) -> "PaperSettings":
        environ = os.environ if environ is None else environ
        settings = cls()
        for name, var in cls.ENV.items():
            if environ.get(var):
                kind = type(getattr(settings, name))
                try:
                    setattr(settings, name, kind(environ[var]))
                except ValueError:
                    raise LaunchError(f"{var}={environ[var]!r} is not a valid {kind.__name__}.") from None
        return settings


def paper_batch_sizes(micro: int, data_parallel: int, target: Tuple[int, int] = (480, 512)) -> Tuple[int, int]:
    """(micro, global) with global a multiple of micro x DP inside nanoGPT's 480..512 sequences, lowering the
    micro-batch if no multiple falls in the range; else the smallest multiple above 480 at micro=1."""
    low, high = target
    for m in range(micro, 0, -1):
        step = m * data_parallel
        multiple = -(-low // step) * step
        if multiple <= high:
            return m, multiple
    return 1, -(-low // data_parallel) * data_parallel


def paper_trainer_args(name: str, settings: PaperSettings, data_parallel: int) -> List[str]:
    micro, global_batch = paper_batch_sizes(settings.micro_batch_size, data_parallel)
    if settings.global_batch_size:
        micro, global_batch = settings.micro_batch_size, settings.global_batch_size
        if global_batch % (micro * data_parallel):
            raise LaunchError(f"GLOBAL_BATCH={global_batch} is not a multiple of MICRO_BATCH ({micro}) x "
                              f"data-parallel size ({data_parallel}).")
    return ["--preset", name, "--data-path", settings.data_path, "--split", "949,50,1",
            "--seq-length", str(settings.seq_length), "--micro-batch-size", str(micro),
            "--global-batch-size", str(global_batch), "--train-iters", str(settings.train_iters),
            "--lr", str(settings.lr), "--min-lr", str(settings.min_lr), "--lr-warmup-iters", str(settings.warmup_iters),
            "--precision", settings.precision, "--zero-stage", str(settings.zero_stage),
            "--activation-checkpointing", settings.activation_checkpointing,
            "--save", f"{settings.save_root}/{name}", "--load", f"{settings.save_root}/{name}",
            "--save-interval", str(settings.save_interval), "--eval-interval", str(settings.eval_interval),
            "--eval-iters", str(settings.eval_iters), "--log-interval", str(settings.log_interval),
            "--run-dir", f"{settings.run_root}/{name}"]


def paper_rows(nodes: int, gpus_per_node: int, presets: Sequence[str] = PAPER_PRESETS,
               seq_length: int = 1024) -> List[Dict[str, float]]:
    from ..config import preset as get_preset
    from ..model.stats import model_summary

    rows = []
    for name in presets:
        cfg = get_preset(name).model
        summary = model_summary(cfg, seq_length)
        mem = zero_model_state_bytes(int(summary["params"]), largest_layer_params(cfg), nodes, gpus_per_node)
        rows.append({"preset": name, **summary, **mem})
    return rows


def format_paper_table(rows: List[Dict[str, float]], nodes: int, gpus_per_node: int) -> str:
    gib = 2 ** 30
    n = nodes * gpus_per_node
    lines = [f"Model-state memory per GPU (bf16 weights + fp32 Adam, no activations, no offload) on {nodes} node(s) "
             f"x {gpus_per_node} GPU(s) = {n} data-parallel rank(s):",
             "",
             "| preset | params | layers x loops (x inner) | depth | GFLOPs/token (train) | ZeRO-0 GiB | ZeRO-1 GiB | "
             "ZeRO-2 GiB | ZeRO-3 GiB |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        shape = f"{r['unique_layers']} x {r['num_loops']}" + (f" x {r['inner_loops']}" if r["inner_loops"] > 1 else "")
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {shape} | {r['effective_depth']} | "
                     f"{r['flops_per_token'] / 1e9:.3f} | {r['zero0'] / gib:.2f} | {r['zero1'] / gib:.2f} | "
                     f"{r['zero2'] / gib:.2f} | {r['zero3'] / gib:.2f} |")
    lines += ["",
              "ZeRO-2/3 from DeepSpeed's estimate_zero2/3_model_states_mem_needs (cpu_offload=False); ZeRO-1 = 4P + 16P/N "
              "bytes and ZeRO-0 = 20P bytes (same per-parameter accounting: 2 bf16 weights + 2 bf16 grads + 16 fp32 "
              "grads/master/Adam m,v). Activations come on top and grow with loops x layers x micro-batch x sequence."]
    return "\n".join(lines)
