"""DeepSpeed training: the `Trainer` (setup, train step, evaluate, save, log) and what it is built from.

`arguments` parses the command line into a Config, `distributed` starts the processes, `ds_config` builds
DeepSpeed's JSON, `optim` the parameter groups and LR schedule, `data` the samplers and loaders,
`monitor` TensorBoard/metrics/progress output, `diagnostics` the TP-aware grad norm and gate means,
`signals` the clean stop on SIGTERM/SIGINT, and `trainer` the run itself. Checkpoints are written and read
through `loop_megatron.checkpoint`. Entry points: `python -m loop_megatron.train` (see
`loop_megatron.train.main`) and, from Python, `pretrain(cfg, opts)` on every rank.
"""
from .arguments import RunOptions, build_parser, config_from_args
from .trainer import Trainer, preflight, pretrain

__all__ = ["RunOptions", "Trainer", "build_parser", "config_from_args", "preflight", "pretrain"]
