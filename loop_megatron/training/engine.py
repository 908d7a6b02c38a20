"""Building the DeepSpeed engine the trainer steps: optional torch.compile of the blocks, the DeepSpeed
config, `deepspeed.initialize`, and the gradient clipper where the trainer clips (see training/step.py).

`pretrain` and `bench/step_bench.py` both build their engine here, so the bench measures the trainer's
own engine and step.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ..config import Config, global_batch_size
from ..model.attention import flash_attention_available
from ..parallel import ModelParallelUnit
from .compile import CompileTimer, compile_blocks
from .ds_config import build_ds_config
from .optim import LRScheduler, parameter_groups
from .step import FusedClipper, trainer_clips
from .zero3 import loop_reuse_distance


def attention_backend_line(cfg: Config, precision: str, cuda: Optional[bool] = None) -> str:
    """One sentence naming the attention kernel this run uses, and why."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    wanted = cfg.model.attention_backend
    if wanted == "sdpa":
        return "attention: PyTorch SDPA (model.attention_backend=sdpa)"
    if not flash_attention_available():
        return "attention: PyTorch SDPA (flash-attn is not installed)"
    if not cuda:
        return "attention: PyTorch SDPA (flash-attn needs a CUDA device)"
    if precision not in ("bf16", "fp16"):
        return f"attention: PyTorch SDPA (flash-attn needs bf16/fp16, this run is {precision})"
    return f"attention: flash-attn ({precision}, CUDA)"


def build_engine(cfg: Config, model: torch.nn.Module, dp_size: int, precision: str,
                 ds_base: Optional[Dict[str, Any]] = None,
                 log: Callable[[str], None] = print) -> Tuple[Any, Optional[FusedClipper], Optional[CompileTimer]]:
    """(engine, clipper or None, compile timer or None) for `model`, as `pretrain` runs it."""
    import deepspeed

    t = cfg.training
    log(attention_backend_line(cfg, precision))
    if cfg.parallel.sequence_parallel:  # before compiling and before ZeRO partitions: it marks parameters
        on_shards = model.enable_sequence_parallel()
        log(f"sequence parallelism: the residual stream is 1/{cfg.parallel.tensor_model_parallel_size} of the "
            f"sequence per TP rank; {len(on_shards)} replicated parameter(s) on shards get TP-summed gradients"
            if on_shards else "note: parallel.sequence_parallel has no effect at TP=1 (no TP ranks to shard the "
                              "sequence over)")
    timer = None
    if t.compile:
        n = compile_blocks(model)
        timer = CompileTimer(log)
        log(f"torch.compile: {n} block(s) compiled lazily at the first step (one graph serves every loop)")
    ds_config = build_ds_config(cfg, dp_size, precision, ds_base, reuse_distance=loop_reuse_distance(model))
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=parameter_groups(model, t.weight_decay), config=ds_config,
        mpu=ModelParallelUnit(), lr_scheduler=lambda opt: LRScheduler(opt, t, global_batch_size(cfg, dp_size)))
    if t.zero_stage == 0 and engine.dp_world_size == 1:
        # One data-parallel rank: DeepSpeed would still flatten every gradient into a buffer, "all-reduce"
        # it over a group of one and copy it back: a full pass over the gradients per step for nothing.
        engine.enable_backward_allreduce = False
    clipper = None
    if trainer_clips(t.zero_stage, precision):
        clipper = FusedClipper([p for p in engine.module.parameters() if p.requires_grad], t.clip_grad)
    return engine, clipper, timer
