#!/usr/bin/env python
"""Truncated backprop: forward+backward time and peak memory of a recurrent-depth model versus the loop
count r, with gradient through all r iterations and through only the last k.

    python bench/truncation_bench.py [--hidden-size 256] [--batch 8] [--seq 128] [--loops 2 4 8 12] [--k 2]

The model is a prelude / core / coda stack with linear injection (the tiny-recurrent recipe). With
backprop through all iterations the peak grows by about one iteration's activations per extra loop; with
k it should stop growing once r > k (the first r - k iterations run under torch.no_grad()), and the
backward time should stop growing too (only the forward still scales with r). Peak memory is measured
above the level before the step, in MiB and in units of one hidden state (batch x seq x hidden, fp32);
on CPU it is sampled after every ATen op (loop_megatron/utils/profiling.py).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from loop_megatron.config import ModelConfig  # noqa: E402
from loop_megatron.model import LoopDepth, LoopGPT  # noqa: E402
from loop_megatron.utils.profiling import time_and_peak  # noqa: E402


def measure(model: LoopGPT, ids: torch.Tensor, loops: int, k: int, device: torch.device, repeats: int):
    def step():
        _, loss = model(ids[:, :-1], ids[:, 1:], depth=LoopDepth(loops, k))
        loss.backward()

    return time_and_peak(step, device, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096, help="small vocab keeps the LM head from dominating")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--loops", type=int, nargs="+", default=[2, 4, 8, 12])
    parser.add_argument("--k", type=int, default=2, help="backprop_loops of the truncated rows")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig(vocab_size=args.vocab, make_vocab_size_divisible_by=1, max_position_embeddings=args.seq,
                      hidden_size=args.hidden_size, num_attention_heads=args.heads, prelude_layers=1, num_layers=2,
                      coda_layers=1, num_loops=max(args.loops), loop_gates="none", loop_injection="linear",
                      loop_state_init="random")
    torch.manual_seed(0)
    model = LoopGPT(cfg).to(device).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    hidden_state_bytes = args.batch * args.seq * args.hidden_size * 4
    print(f"# truncation_bench: d={args.hidden_size}, 1 prelude + 2 core x r + 1 coda, linear injection, batch "
          f"{args.batch} x seq {args.seq}, fp32 on {device}; one hidden state = {hidden_state_bytes / 2**20:.2f} MiB")
    measure(model, ids, args.loops[0], 0, device, 1)  # warm the allocator so the first row is not charged for it
    print()
    print("| backprop | r | fwd+bwd ms | peak MiB | peak / hidden state |")
    print("|---|---:|---:|---:|---:|")
    for k in (0, args.k):
        for loops in args.loops:
            seconds, peak = measure(model, ids, loops, k, device, args.repeats)
            label = "all r" if k == 0 else f"last {k}"
            print(f"| {label} | {loops} | {seconds * 1e3:.1f} | {peak / 2**20:.1f} | {peak / hidden_state_bytes:.1f} |")


if __name__ == "__main__":
    main()
