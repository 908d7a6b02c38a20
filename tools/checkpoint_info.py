#!/usr/bin/env python
"""What a loop_megatron checkpoint holds, and the command lines that resume it (also on another layout).

    python tools/checkpoint_info.py checkpoints/loop-81m              # the 'latest' tag of a save folder
    python tools/checkpoint_info.py checkpoints/loop-81m/iter_0005000 # one tag folder
    python tools/checkpoint_info.py checkpoints/loop-81m --json

Reports the model shape and parameter count, the layout it was saved on (TP, DP, ZeRO stage, CPU offload,
precision), iteration, consumed samples, tokens seen, whether model.pt, DeepSpeed's shards and the
topology-free universal/ state are present (and complete), whether the weights are all finite, the
tokenizer, the bytes per parameter of each part against the minimal state, and how to resume. Exit status 1 when the weights hold NaN/inf (not a good checkpoint).
CONFIG.yaml in the commands is the run's config (saved in its run folder as config.yaml).
"""
import argparse
import json
import sys

import _bootstrap  # noqa: F401  (repo root on sys.path)

from loop_megatron.checkpoint.info import describe, format_text
from loop_megatron.errors import LoopMegatronError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a --save folder (uses its 'latest' file) or one tag folder")
    parser.add_argument("--tag", default=None, help="tag inside a save folder, e.g. iter_0000100")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        record = describe(args.path, args.tag)
    except LoopMegatronError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2) if args.json else format_text(record))
    return 1 if record["weights"]["finite"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
