#!/usr/bin/env python
"""Forward+backward time and peak memory of a small looped model versus loop count, with activation
checkpointing off and per-iteration.

    python bench/model_bench.py [--hidden-size 256] [--batch 8] [--seq 128] [--loops 1 2 4 8 12]

Peak memory is measured above the level before the step (weights and gradient buffers excluded) and is
also shown in units of one hidden-state tensor (batch x seq x hidden, fp32): with per-iteration
checkpointing each extra loop should add about one or two of those; without it, a whole iteration's
activations. On CPU, memory is sampled after every ATen op (see loop_megatron/utils/profiling.py).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from loop_megatron.config import ModelConfig  # noqa: E402
from loop_megatron.model import LoopGPT  # noqa: E402
from loop_megatron.utils.profiling import time_and_peak  # noqa: E402


def measure(cfg: ModelConfig, batch: int, seq: int, device: torch.device, repeats: int):
    torch.manual_seed(0)
    model = LoopGPT(cfg).to(device).train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)

    def step():
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()

    return time_and_peak(step, device, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=1, help="unique blocks in the loop")
    parser.add_argument("--vocab", type=int, default=4096, help="small vocab keeps the LM head from dominating")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--loops", type=int, nargs="+", default=[1, 2, 4, 8, 12])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hidden_state_bytes = args.batch * args.seq * args.hidden_size * 4
    print(f"# model_bench: d={args.hidden_size}, {args.layers} layer(s) x N loops, vector gates, batch {args.batch} "
          f"x seq {args.seq}, fp32 on {device}; one hidden state = {hidden_state_bytes / 2**20:.2f} MiB")
    rows = {}
    # Warm the allocator and kernels once so the first row is not charged for start-up.
    measure(ModelConfig(vocab_size=args.vocab, make_vocab_size_divisible_by=1, max_position_embeddings=args.seq,
                        hidden_size=args.hidden_size, num_attention_heads=args.heads, num_layers=args.layers,
                        num_loops=2), args.batch, args.seq, device, 1)
    for mode in ("none", "per-iteration"):
        for loops in args.loops:
            cfg = ModelConfig(vocab_size=args.vocab, make_vocab_size_divisible_by=1, max_position_embeddings=args.seq,
                              hidden_size=args.hidden_size, num_attention_heads=args.heads, num_layers=args.layers,
                              num_loops=loops, loop_gates="vector", activation_checkpointing=mode)
            rows[(mode, loops)] = measure(cfg, args.batch, args.seq, device, args.repeats)
    print()
    print("| checkpointing | loops | fwd+bwd ms | peak MiB | peak / hidden state | added per extra loop (hidden states) |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in ("none", "per-iteration"):
        prev = None
        for loops in args.loops:
            seconds, peak = rows[(mode, loops)]
            units = peak / hidden_state_bytes
            per_loop = "" if prev is None else f"{(units - prev[1]) / (loops - prev[0]):.2f}"
            print(f"| {mode} | {loops} | {seconds * 1e3:.1f} | {peak / 2**20:.1f} | {units:.1f} | {per_loop} |")
            prev = (loops, units)
    first, last = args.loops[0], args.loops[-1]
    for mode in ("none", "per-iteration"):
        slope = (rows[(mode, last)][1] - rows[(mode, first)][1]) / hidden_state_bytes / (last - first)
        print(f"\n{mode}: {slope:.2f} hidden-state tensors of peak memory per extra loop ({first}->{last} loops)")


if __name__ == "__main__":
    main()
