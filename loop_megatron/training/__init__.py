"""DeepSpeed training: the `Trainer` (setup, train step, evaluate, save, log) and what it is built from.

`arguments` parses the command line into a Config, `distributed` starts the processes, `ds_config` builds
DeepSpeed's JSON, `optim` the parameter groups and LR schedule, `data` the samplers and loaders,
`monitor` TensorBoard/metrics/progress output, `diagnostics` the TP-aware grad norm and gate means,
and `trainer` the run itself (the clean stop on SIGTERM/SIGINT: `loop_megatron.utils.signals`). Checkpoints are written and read
through `loop_megatron.checkpoint`. Entry points: `python -m loop_megatron.train` (see
`loop_megatron.train.main`) and, from Python, `pretrain(cfg, opts)` on every rank.
"""
from .arguments import RunOptions, build_parser, config_from_args


def __getattr__(name):
    # The trainer (torch, DeepSpeed) loads on first use, so `launch/train.sh` can parse and check a trainer
    # command line (training.arguments) in a fraction of a second before it starts any rank.
    if name in ("Trainer", "preflight", "pretrain"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RunOptions", "Trainer", "build_parser", "config_from_args", "preflight", "pretrain"]
