"""`python -m loop_megatron.train`: train a Loop-Residual GPT (single process, deepspeed or torchrun).

Examples:
    python -m loop_megatron.train --preset tiny-2l-2loop --data-path data/sotu_text_document \\
        --train-iters 200 --save ckpt/tiny --load ckpt/tiny
    deepspeed --num_gpus 8 -m loop_megatron.train --preset loop-81m --data-path ... \\
        --deepspeed-config ds_configs/zero1.json --global-batch-size 512 --micro-batch-size 16

Bad settings stop before any heavy work with one sentence on stderr and exit status 2.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    from .utils.signals import STOP_REQUEST

    STOP_REQUEST.install()  # before torch is imported: a stop signal during start-up is kept, not lost
    from .errors import LoopMegatronError
    from .training import config_from_args, pretrain

    try:
        cfg, opts = config_from_args(argv)
        pretrain(cfg, opts)
    except LoopMegatronError as exc:
        if getattr(exc, "printed", False):  # another rank stopped: named once for the job already
            return 1
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        STOP_REQUEST.uninstall()
    return 0


if __name__ == "__main__":
    sys.exit(main())
