#!/usr/bin/env python
"""Train a byte-level BPE tokenizer (Hugging Face tokenizers) and write DIR/tokenizer.json.

    python tools/train_tokenizer.py --input data/corpus/*.jsonl --vocab-size 8192 --output tokenizers/corpus8k
    python tools/train_tokenizer.py --input data/owt.jsonl my_txt_folder/ --vocab-size 16384 --output tok16k

Inputs are what tools/preprocess_data.py reads (.jsonl/.json files, globs, folders of .txt documents,
saved Hugging Face datasets), several at once. The tokenizer has GPT-2's pre-tokenizer and byte
alphabet and <|endoftext|> (id 0) as end-of-document token; the same input gives a byte-identical
tokenizer.json. Then preprocess with --tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR.
"""

import argparse
import sys

import _bootstrap  # noqa: F401  (this checkout first on sys.path, before any installed copy)

from loop_megatron.data.tokenizer_training import train_bpe_tokenizer
from loop_megatron.errors import LoopMegatronError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="input files, folders, globs or saved HF datasets")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON fields holding the text (default: text)")
    p.add_argument("--hf-split", default="train", help="split to read from a saved Hugging Face DatasetDict")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size incl. 256 bytes and <|endoftext|>")
    p.add_argument("--min-frequency", type=int, default=2, help="never merge pairs seen fewer times (default 2)")
    p.add_argument("--output", required=True, help="folder to write tokenizer.json (and tokenizer_config.json) into")
    p.add_argument("--skip-bad-records", action="store_true", help="skip malformed records instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        stats = train_bpe_tokenizer(
            args.input, args.vocab_size, args.output, json_keys=args.json_keys, hf_split=args.hf_split,
            min_frequency=args.min_frequency, skip_bad_records=args.skip_bad_records, progress=not args.no_progress,
        )
    except LoopMegatronError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no tokenizer written", file=sys.stderr)
        return 130
    print(stats.summary())
    if stats.vocab_size < args.vocab_size:
        print(f"note: the input supports only {stats.vocab_size:,} tokens (asked for {args.vocab_size:,}); "
              "use more text or a lower --min-frequency for the full size.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
