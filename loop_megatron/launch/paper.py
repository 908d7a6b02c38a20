"""The paper's five GPT-2-small-width runs: batch sizes, trainer flags and the size table.

The recipe itself (data, schedule, precision, ZeRO stage, intervals) is the presets' (`config.paper_recipe`);
`launch/run_paper_experiments.sh` (through `cli.main_paper`) prints this plan with `--dry-run` and runs it
otherwise. Each setting can be changed through the environment variable named in `PAPER_ENV`; the run and
checkpoint folders of the campaign through SAVE_ROOT and RUN_ROOT.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..config import Config, ConfigError, preset, set_field
from .errors import LaunchError
from .memory import largest_layer_params, zero_model_state_bytes

PAPER_PRESETS = ("gpt2-124m", "loop-81m", "loop-67m", "lite-45m", "loop-45m")

PAPER_ENV: Dict[str, str] = {
    "OWT_DATA": "data.data_path", "SEQ_LENGTH": "data.seq_length", "MICRO_BATCH": "training.micro_batch_size",
    "GLOBAL_BATCH": "training.global_batch_size", "TRAIN_ITERS": "training.train_iters", "LR": "training.lr",
    "MIN_LR": "training.min_lr", "WARMUP_ITERS": "training.lr_warmup_iters", "ZERO_STAGE": "training.zero_stage",
    "PRECISION": "training.precision", "ACT_CKPT": "model.activation_checkpointing",
    "SAVE_INTERVAL": "training.save_interval", "EVAL_INTERVAL": "training.eval_interval",
    "EVAL_ITERS": "training.eval_iters", "LOG_INTERVAL": "training.log_interval",
}
"""Environment variable -> the config field it sets in every paper run (empty or unset: the preset's value).
GLOBAL_BATCH unset or 0 picks a multiple of micro-batch x ranks in nanoGPT's 480..512 sequences."""

PAPER_ENV_ALIASES: Dict[str, str] = {"DATA": "OWT_DATA"}
"""Older names still read (launch/presets/_common.sh's): the alias counts only when the main name is unset."""


@dataclass
class PaperSettings:
    """The environment's changes to the paper recipe, and where the campaign keeps its runs."""

    overrides: Dict[str, str] = field(default_factory=dict)
    """config key -> value from the environment (PAPER_ENV)."""
    save_root: str = "checkpoints/paper"
    run_root: str = "runs/paper"

    @classmethod
    def from_env(cls, environ: Optional[Dict[str, str]] = None) -> "PaperSettings":
        environ = os.environ if environ is None else environ
        settings = cls(save_root=environ.get("SAVE_ROOT") or cls.save_root,
                       run_root=environ.get("RUN_ROOT") or cls.run_root)
        for alias, var in PAPER_ENV_ALIASES.items():
            if environ.get(alias) and not environ.get(var):
                environ = dict(environ, **{var: environ[alias]})
        for var, key in PAPER_ENV.items():
            if environ.get(var):
                settings.overrides[key] = environ[var]
        for name in PAPER_PRESETS:  # a bad value stops here, naming its variable
            settings.config(name)
        return settings

    def config(self, name: str) -> Config:
        """The preset's recipe with the environment's changes."""
        cfg = preset(name)
        for key, value in self.overrides.items():
            section, attr = key.split(".")
            kind = type(getattr(getattr(cfg, section), attr))
            try:
                set_field(cfg, key, value, "the environment")
            except ConfigError:
                var = next(v for v, k in PAPER_ENV.items() if k == key)
                raise LaunchError(f"{var}={value!r} is not a valid {kind.__name__}.") from None
        return cfg

    @property
    def explicit_global_batch(self) -> bool:
        return bool(int(self.overrides.get("training.global_batch_size", 0) or 0))


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


def run_batch_sizes(cfg: Config, settings: PaperSettings, data_parallel: int) -> Tuple[int, int]:
    """(micro, global) of a paper run: GLOBAL_BATCH with MICRO_BATCH when set, else paper_batch_sizes."""
    t = cfg.training
    if not settings.explicit_global_batch:
        return paper_batch_sizes(t.micro_batch_size, data_parallel)
    if t.global_batch_size % (t.micro_batch_size * data_parallel):
        raise LaunchError(f"GLOBAL_BATCH={t.global_batch_size} is not a multiple of MICRO_BATCH ({t.micro_batch_size}) "
                          f"x data-parallel size ({data_parallel}).")
    return t.micro_batch_size, t.global_batch_size


def paper_trainer_args(name: str, settings: PaperSettings, data_parallel: int) -> List[str]:
    """The trainer flags of one paper run: the recipe's values spelled out (so the plan shows them), the
    batch sizes for this rank count, and the campaign's folders."""
    cfg = settings.config(name)
    d, t = cfg.data, cfg.training
    micro, global_batch = run_batch_sizes(cfg, settings, data_parallel)
    return ["--preset", name, "--data-path", *d.data_path, "--split", d.split,
            "--seq-length", str(d.seq_length), "--micro-batch-size", str(micro),
            "--global-batch-size", str(global_batch), "--train-iters", str(t.train_iters),
            "--lr", str(t.lr), "--min-lr", str(t.min_lr), "--lr-warmup-iters", str(t.lr_warmup_iters),
            "--precision", t.precision, "--zero-stage", str(t.zero_stage),
            "--activation-checkpointing", cfg.model.activation_checkpointing,
            "--save", f"{settings.save_root}/{name}", "--load", f"{settings.save_root}/{name}",
            "--save-interval", str(t.save_interval), "--eval-interval", str(t.eval_interval),
            "--eval-iters", str(t.eval_iters), "--log-interval", str(t.log_interval),
            "--run-dir", f"{settings.run_root}/{name}"]


def paper_rows(nodes: int, gpus_per_node: int, presets: Sequence[str] = PAPER_PRESETS,
               seq_length: int = 1024) -> List[Dict[str, float]]:
    from ..model.stats import model_summary

    rows = []
    for name in presets:
        cfg = preset(name).model
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
