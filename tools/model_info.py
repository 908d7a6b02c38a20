#!/usr/bin/env python
"""Parameter count, effective depth and FLOPs per token of a preset (or config file).

    python tools/model_info.py --preset loop-81m
    python tools/model_info.py --preset loop-67m --json
    python tools/model_info.py --all
"""
import argparse
import json
import sys

import _bootstrap  # noqa: F401  (repo root on sys.path)

from loop_megatron.config import PRESET_DESCRIPTIONS, PRESETS, load_config
from loop_megatron.errors import LoopMegatronError
from loop_megatron.model import model_summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--config", help="YAML/JSON config file (applied after --preset)")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="change one config field (repeatable)")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="sequence length for FLOPs (default: the config's data.seq_length)")
    parser.add_argument("--all", action="store_true", help="a table of every preset")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        names = list(PRESETS) if args.all else [args.preset]
        if not args.all and not (args.preset or args.config):
            parser.error("give --preset NAME, --config FILE or --all")
        rows = []
        for name in names:
            cfg = load_config(name, None if args.all else args.config, None if args.all else args.override)
            cfg.validate()
            summary = model_summary(cfg.model, args.seq_length or cfg.data.seq_length)
            rows.append({"preset": name or args.config, **summary})
    except LoopMegatronError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows if args.all else rows[0], indent=None if not args.all else 1))
        return 0
    header = f"{'preset':<15} {'params':>10} {'non-emb':>10} {'layers':>6} {'loops':>5} {'inner':>5} {'depth':>5} " \
             f"{'seq':>5} {'GFLOPs/token (train)':>20}  description"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['preset']:<15} {r['params'] / 1e6:>9.2f}M {r['non_embedding_params'] / 1e6:>9.2f}M "
              f"{r['unique_layers']:>6} {r['num_loops']:>5} {r['inner_loops']:>5} {r['effective_depth']:>5} "
              f"{r['seq_length']:>5} {r['flops_per_token'] / 1e9:>20.3f}  {PRESET_DESCRIPTIONS.get(r['preset'], '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
