"""The DeepSpeed config dict, filled in from the trainer's own Config so the two never disagree.

A JSON file given with `--deepspeed-config` is the starting point (ZeRO tuning knobs, communication
settings, ...). The trainer owns batch sizes, gradient clipping, precision, the optimizer and the LR
schedule: a file that sets one of those to a value other than the trainer's stops the run with one
sentence naming both values ("auto" counts as unset). ZeRO stage and CPU offload are taken from the
file when the trainer's config does not set them on purpose, and must agree when it does.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, Optional, Set


from ..config import Config, ConfigError, accumulation_steps, global_batch_size

# ZeRO tuning used when no --deepspeed-config file is given (the same values as ds_configs/zero*.json).
# DeepSpeed's own default buckets are 5e8 elements: ~1.9 GiB of fp32 buffers per rank under ZeRO-1/2/3,
# far more than a small model's whole state (see bench/train_bench.py).
DEFAULT_ZERO_TUNING = {
    1: {"reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000},
    2: {"overlap_comm": False, "contiguous_gradients": True, "reduce_scatter": True,
        "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000},
    3: {"overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": 50_000_000,
        "stage3_prefetch_bucket_size": 50_000_000, "stage3_param_persistence_threshold": 100_000,
        # stage3_max_reuse_distance is not fixed here: build_ds_config sets it from the model (the loop's
        # size, training/zero3.py), so the shared blocks are gathered once per step, not once per
        # iteration, and everything else is released after use (bench/zero3_gather_bench.py).
        "stage3_max_live_parameters": 1_000_000_000,
        "stage3_gather_16bit_weights_on_model_save": False},
}


def trainer_clips(zero_stage: int, precision: str) -> bool:
    """True where the trainer clips gradients itself (training/step.py FusedClipper) and DeepSpeed's
    `gradient_clipping` is set to 0: ZeRO-0 in fp32, the one case where DeepSpeed clips with a
    per-parameter loop and does not report the norm it computed."""
    return zero_stage == 0 and precision == "fp32"


def gpu_zero_tuning(tuning: Dict[str, Any], cuda: bool) -> Dict[str, Any]:
    """The default ZeRO tuning for this machine: on CUDA (NCCL), ZeRO-2/3 overlap gradient reduction with
    the backward pass (`overlap_comm`). On CPU/gloo it stays off: it runs there (ZeRO-2 and ZeRO-3 give
    bit-identical losses with it on), but with no side streams there is nothing to overlap and its extra
    buffers cost memory. The shipped ds_configs/ files carry the CPU values."""
    tuning = dict(tuning)
    if cuda and "overlap_comm" in tuning:
        tuning["overlap_comm"] = True
    return tuning


def load_ds_file(path: str) -> Dict[str, Any]:
    if not os.path.exists(path):
        raise ConfigError(f"training.deepspeed_config: DeepSpeed config file {path} not found.")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"training.deepspeed_config: cannot parse {path} as JSON ({exc}).") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"training.deepspeed_config: {path} must hold a JSON object.")
    return raw


def _is_set(value: Any) -> bool:
    return value is not None and value != "auto"


def adopt_ds_file_settings(cfg: Config, explicit: Set[str]) -> Optional[Dict[str, Any]]:
    """Read cfg.training.deepspeed_config (if any); take its ZeRO stage/offload unless set on purpose.

    Returns the file's dict (or None). Raises ConfigError on an unknown stage or a disagreement.
    """
    t = cfg.training
    if not t.deepspeed_config:
        return None
    path = t.deepspeed_config
    raw = load_ds_file(path)
    zero = raw.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ConfigError(f"training.deepspeed_config: zero_optimization in {path} must be a JSON object.")
    stage = zero.get("stage")
    if _is_set(stage):
        if not isinstance(stage, int) or isinstance(stage, bool) or stage not in (0, 1, 2, 3):
            raise ConfigError(f"training.deepspeed_config: {path} sets zero_optimization.stage to {stage!r}, "
                              "which is not a ZeRO stage (0, 1, 2 or 3).")
        if "training.zero_stage" in explicit and stage != t.zero_stage:
            raise ConfigError(f"training.zero_stage is {t.zero_stage} but {path} sets zero_optimization.stage "
                              f"to {stage}; make them agree or drop one.")
        t.zero_stage = stage
    offload = zero.get("offload_optimizer") or {}
    file_offload = isinstance(offload, dict) and offload.get("device") == "cpu"
    if file_offload != t.cpu_offload:
        if "training.cpu_offload" in explicit and t.cpu_offload and not file_offload:
            pass  # the trainer adds the offload section itself
        elif "training.cpu_offload" in explicit:
            raise ConfigError(f"training.cpu_offload is {t.cpu_offload} but {path} sets "
                              f"zero_optimization.offload_optimizer.device to {offload.get('device')!r}.")
        else:
            t.cpu_offload = file_offload
    for section in ("optimizer", "scheduler"):
        if section in raw:
            raise ConfigError(f"training.deepspeed_config: {path} has a '{section}' section, but the trainer "
                              f"builds AdamW and its warmup+cosine schedule from training.* itself; remove it.")
    return raw


def resolve_precision(cfg: Config, cuda: Optional[bool] = None) -> str:
    """'fp32', 'bf16' or 'fp16' for this machine; ConfigError where the hardware cannot do it."""
    import torch  # here, not at the top: launch/train.sh reads the DeepSpeed file without torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    p = cfg.training.precision
    if p == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if p == "fp16" and not cuda:
        raise ConfigError("training.precision fp16 needs a CUDA GPU (DeepSpeed refuses fp16 on CPU); "
                          "use bf16 or fp32.")
    if p == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("training.precision bf16 is not supported by this GPU; use fp16 or fp32.")
    return p


def gradient_accumulation_steps(cfg: Config, dp_size: int) -> int:
    """config.accumulation_steps (kept under this name for callers of ds_config)."""
    return accumulation_steps(cfg, dp_size)


def build_ds_config(cfg: Config, dp_size: int, precision: str, base: Optional[Dict[str, Any]] = None,
                    cuda: Optional[bool] = None, reuse_distance: Optional[int] = None) -> Dict[str, Any]:
    """The dict handed to deepspeed.initialize(config=...). `reuse_distance`: ZeRO-3's
    stage3_max_reuse_distance where the DeepSpeed config does not set it (training/zero3.py
    loop_reuse_distance(model); None leaves DeepSpeed's default)."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    t = cfg.training
    path = t.deepspeed_config or "the DeepSpeed config"
    ds = copy.deepcopy(base) if base else {}
    gbs = global_batch_size(cfg, dp_size)
    accum = accumulation_steps(cfg, dp_size)
    owned = {
        "train_batch_size": ("training.global_batch_size", gbs),
        "train_micro_batch_size_per_gpu": ("training.micro_batch_size", t.micro_batch_size),
        "gradient_accumulation_steps": ("gradient accumulation (global / (micro x DP))", accum),
        "gradient_clipping": ("training.clip_grad", float(t.clip_grad)),
    }
    for key, (ours, value) in owned.items():
        if _is_set(ds.get(key)) and float(ds[key]) != float(value):
            raise ConfigError(f"{path} sets {key} to {ds[key]} but this run has {ours} = {value}; "
                              "remove it from the file or make them agree.")
        ds[key] = value
    for kind in ("bf16", "fp16"):
        section = ds.get(kind) or {}
        enabled = section.get("enabled") if isinstance(section, dict) else None
        want = precision == kind
        if _is_set(enabled) and bool(enabled) != want:
            raise ConfigError(f"{path} sets {kind}.enabled to {str(bool(enabled)).lower()} but this run's "
                              f"precision is {precision} (training.precision={t.precision}).")
        section = dict(section) if isinstance(section, dict) else {}
        section["enabled"] = want
        ds[kind] = section
    if "bfloat16" in ds:  # old alias of "bf16"
        ds.pop("bfloat16")
    if t.skip_nonfinite_steps and precision == "bf16":
        # DeepSpeed's bf16 optimizers skip a step with a non-finite global norm only with this on (its
        # default); training.skip_nonfinite_steps relies on it (training/step.py).
        if ds["bf16"].get("check_grad_overflow") is False:
            raise ConfigError(f"{path} sets bf16.check_grad_overflow to false, but training.skip_nonfinite_steps "
                              "needs DeepSpeed to skip steps whose gradient norm is not finite; remove it.")
        ds["bf16"]["check_grad_overflow"] = True
    zero = dict(ds.get("zero_optimization") or gpu_zero_tuning(DEFAULT_ZERO_TUNING.get(t.zero_stage, {}), cuda))
    zero["stage"] = t.zero_stage
    if t.zero_stage == 3 and reuse_distance is not None and "stage3_max_reuse_distance" not in zero:
        zero["stage3_max_reuse_distance"] = reuse_distance
    if t.cpu_offload:
        offload = dict(zero.get("offload_optimizer") or {})
        offload["device"] = "cpu"
        offload.setdefault("pin_memory", bool(cuda))
        zero["offload_optimizer"] = offload
    elif isinstance(zero.get("offload_optimizer"), dict):
        zero.pop("offload_optimizer")
    ds["zero_optimization"] = zero
    ds["optimizer"] = {
        "type": "AdamW",
        "params": {
            "lr": t.lr,
            "betas": [t.adam_beta1, t.adam_beta2],
            "eps": t.adam_eps,
            "weight_decay": t.weight_decay,
            # torch.optim.AdamW: no fused_adam JIT build (needs nvcc on GPU, ~100 s on CPU). CPU offload
            # needs DeepSpeedCPUAdam instead, which DeepSpeed picks when torch_adam is off.
            "torch_adam": not t.cpu_offload,
        },
    }
    if cuda and not t.cpu_offload:
        ds["optimizer"]["params"]["fused"] = True  # torch's fused AdamW kernel: one launch per step
    if t.cpu_offload:
        ds["zero_force_ds_cpu_optimizer"] = True
    if trainer_clips(t.zero_stage, precision):
        ds["gradient_clipping"] = 0.0  # the trainer clips (and reports the norm): training/step.py
    ds.setdefault("steps_per_print", 10 ** 9)  # the trainer prints its own progress
    ds.setdefault("wall_clock_breakdown", False)
    return ds
