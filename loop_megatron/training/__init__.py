"""DeepSpeed training: arguments, distributed init, DeepSpeed config, schedule, checkpoints, logging, loop.

Entry points: `python -m loop_megatron.train` (see `loop_megatron.train.main`) and, from Python,
`pretrain(cfg, opts)` on every rank.
"""
from .arguments import RunOptions, build_parser, config_from_args
from .trainer import preflight, pretrain

__all__ = ["RunOptions", "build_parser", "config_from_args", "preflight", "pretrain"]
