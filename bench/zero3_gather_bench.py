#!/usr/bin/env python
"""ZeRO-3 and shared loop weights: all-gathers, bytes and resident parameters per training step.

    python bench/zero3_gather_bench.py [--loops 1 2 4] [--hidden 128] [--prelude 1] [--coda 1] [--steps 3]

Two gloo ranks (CPU), prelude P blocks + one shared block x N loops + coda C blocks (additive injection
when P > 0) with vector gates, vocab 4096, micro batch 2 x seq 64, fp32, the trainer's engine
(`build_engine`) and step (`train_step`). stage3_param_persistence_threshold is 0 so that every
parameter is partitioned, as the large ones of a real model are. Gathers are counted on rank 0 with
`loop_megatron.parallel.comm_count.AllGatherCounter` (every torch.distributed all-gather entry point plus
the one DeepSpeed's backend caches); resident parameters with `training.zero3.GatheredParameterPeak`
(elements of gathered parameters after every ATen op, in one extra steady step).

Settings compared:
  reuse 0       stage3_max_reuse_distance 0: DeepSpeed releases a parameter after each use, so the shared
                block is gathered again in every iteration's forward and backward
  reuse 1e9     DeepSpeed's default and the trainer's before: every parameter used again in the step
                stays gathered until the step ends (the whole model resident at the peak)
  reuse loop    the trainer's distance (training/zero3.py: 1.25 x the loop's parameters): the loop
                stays gathered across its iterations, the rest is released after use
  default       the trainer's ZeRO-3 defaults (ds_config.DEFAULT_ZERO_TUNING: prefetch bucket 5e7, reuse loop)
Columns: gathers and MiB in step 1 (trace recording) and per step after it; resident: the steady step's
peak of gathered parameter elements as a share of the model; peak MiB is the heap peak of one steady step
above the level before it (loop_megatron/utils/profiling.py: sampled after every ATen op).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

MIB = 2 ** 20
SETTINGS = {
    "no prefetch, reuse 0": {"stage3_prefetch_bucket_size": 0, "stage3_max_reuse_distance": 0},
    "no prefetch, reuse 1e9": {"stage3_prefetch_bucket_size": 0, "stage3_max_reuse_distance": 1_000_000_000},
    "no prefetch, reuse loop": {"stage3_prefetch_bucket_size": 0},
    "prefetch 5e7, reuse 1e9 (old default)": {"stage3_max_reuse_distance": 1_000_000_000},
    "default (prefetch 5e7, reuse loop)": {},
}


def worker(rank, world, loops_list, hidden, steps, prelude, coda):
    from loop_megatron.config import Config
    from loop_megatron.model import LoopGPT
    from loop_megatron.parallel import destroy_model_parallel, initialize_model_parallel
    from loop_megatron.parallel.comm_count import AllGatherCounter
    from loop_megatron.utils.profiling import PeakMemory
    from loop_megatron.training.distributed import skip_shm_comm_build
    from loop_megatron.training.ds_config import DEFAULT_ZERO_TUNING
    from loop_megatron.training.engine import build_engine
    from loop_megatron.training.step import train_step
    from loop_megatron.training.zero3 import GatheredParameterPeak

    skip_shm_comm_build()
    rows = []
    for setting, extra in SETTINGS.items():
        for loops in loops_list:
            initialize_model_parallel(1)
            cfg = Config()
            m = cfg.model
            m.vocab_size, m.make_vocab_size_divisible_by, m.hidden_size, m.num_attention_heads = 4096, 1, hidden, 4
            m.num_layers, m.num_loops, m.max_position_embeddings = 1, loops, 64
            m.prelude_layers, m.coda_layers = prelude, coda
            if prelude:
                m.loop_injection = "add"
            cfg.data.seq_length = 64
            t = cfg.training
            t.micro_batch_size, t.zero_stage, t.precision = 2, 3, "fp32"
            zero = dict(DEFAULT_ZERO_TUNING[3], stage3_param_persistence_threshold=0, **extra)
            torch.manual_seed(0)
            engine, clipper, _ = build_engine(cfg, LoopGPT(m), world, "fp32", {"zero_optimization": zero},
                                              log=lambda s: None)
            gen = torch.Generator().manual_seed(rank)

            def batch():
                return iter([torch.randint(0, 4096, (2, 65), generator=gen)])

            counts, times, peaks = [], [], []
            for s in range(steps + 1):
                with AllGatherCounter() as counter, PeakMemory("cpu") as meter:
                    t0 = time.perf_counter()
                    train_step(engine, batch(), 1, torch.device("cpu"), clipper)
                    took = time.perf_counter() - t0
                counts.append((counter.calls, counter.bytes))
                if s > 0:
                    times.append(took)
                    peaks.append(meter.peak_bytes or 0)
            # Resident parameters in one more steady step: the sampler walks every parameter after each op,
            # which would distort the heap peak and the time measured above.
            with GatheredParameterPeak(engine.module) as resident:
                train_step(engine, batch(), 1, torch.device("cpu"), clipper)
            steady = counts[1:]
            assert all(c == steady[0] for c in steady), f"{setting} {loops}: steady steps differ: {steady}"
            params = sum(p.ds_numel for p in engine.module.parameters())
            rows.append((setting, loops, params, counts[0], steady[0], resident.peak / params, max(peaks),
                         statistics.median(times)))
            engine.destroy()
            destroy_model_parallel()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loops", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="steady steps after the first")
    ap.add_argument("--prelude", type=int, default=1, help="unlooped blocks before the loop")
    ap.add_argument("--coda", type=int, default=1, help="unlooped blocks after the loop")
    args = ap.parse_args()
    from tests.dist_utils import run_distributed

    rows = run_distributed(worker, 2, args.loops, args.hidden, args.steps, args.prelude, args.coda)[0]
    print(f"2 gloo ranks, prelude {args.prelude} + 1 shared block x N loops + coda {args.coda}, d={args.hidden}, "
          "vocab 4096, micro 2 x seq 64, fp32, ZeRO-3 (persistence threshold 0); rank 0\n")
    print("| setting | loops | params | step-1 gathers | step-1 MiB | gathers/step | MiB/step | resident params | "
          "step peak MiB | step ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for setting, loops, params, first, steady, resident, peak, took in rows:
        print(f"| {setting} | {loops} | {params:,} | {first[0]} | {first[1] / MIB:.2f} | {steady[0]} | "
              f"{steady[1] / MIB:.2f} | {resident:.0%} | {peak / MIB:.1f} | {took * 1e3:.0f} |")


if __name__ == "__main__":
    main()
