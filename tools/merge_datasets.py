#!/usr/bin/env python
"""Concatenate Megatron indexed datasets into one.

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document --output-prefix data/ab_text_document

--input takes dataset prefixes (without .bin/.idx) in the order they are concatenated; a folder
stands for every dataset in it, sorted by name. All inputs must share a token dtype. Loss masks of
answer-masked datasets (PREFIX.loss_mask.bin/.idx) are merged with them when every input has one.
"""

import argparse
import os
import sys

import _bootstrap  # noqa: F401  (this checkout first on sys.path, before any installed copy)

from loop_megatron.data.errors import DataError
from loop_megatron.data.merge import merge_datasets
from loop_megatron.data.loss_mask import LOSS_MASK_SUFFIX
from loop_megatron.errors import LoopMegatronError


def expand(inputs):
    """Prefixes named directly, or found (by their .idx files) in folders."""
    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            # A loss-mask companion (PREFIX.loss_mask.idx) travels with its dataset, it is not one itself.
            found = sorted(os.path.join(item, f[:-4]) for f in os.listdir(item)
                           if f.endswith(".idx") and not f.endswith(LOSS_MASK_SUFFIX + ".idx"))
            if not found:
                raise DataError(f"{item}: folder holds no .idx files.")
            prefixes += found
        else:
            prefixes.append(item[:-4] if item.endswith((".bin", ".idx")) else item)
    return prefixes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes or folders of datasets")
    p.add_argument("--output-prefix", required=True, help="prefix of the merged .bin/.idx")
    args = p.parse_args(argv)
    try:
        prefixes = expand(args.input)
        docs = merge_datasets(prefixes, args.output_prefix)
    except LoopMegatronError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Merged {len(prefixes)} datasets ({docs:,} documents) into {args.output_prefix}.{{bin,idx}}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
