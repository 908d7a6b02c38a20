"""Activation memory per rank with and without sequence parallelism (--sequence-parallel), on 2 gloo processes.

What is measured: the bytes of the tensors autograd keeps from the forward for the backward, per rank. Every
tensor saved for backward during one training-mode forward (the loss included) is seen through
torch.autograd.graph.saved_tensors_hooks, counted once per storage (views and tensors saved twice share one),
parameters excluded. Non-reentrant activation checkpointing saves its inputs through the same hooks and
recomputes the rest in the backward, so with checkpointing this is what stays alive between forward and
backward; the transient activations of the iteration being recomputed are not counted (they are one
iteration's worth, alike with and without SP, at the peak of the backward). No allocator is involved: on the
CPU there is no peak-allocated counter, so this counts bytes, not the process's memory.

Layouts: TP=1 (one full replica per rank), TP=2, TP=2 with SP; the model: d=256, 8 heads, 2 shared layers with
vector gates, one prelude and one coda layer, vocab 4096, micro batch 4 x seq 256, fp32, run at 2 and at 6 loops:
the table gives the total at 6 loops and what each extra loop adds (the slope), the part that grows with depth.
One hidden state (B x T x d fp32) is 1 MiB at TP=1.

    python bench/sp_memory_bench.py
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.dist_utils import run_distributed  # noqa: E402

CHECKPOINTING = ("none", "per-block", "per-iteration")


def saved_bytes(model, ids) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward of `model` (training mode)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()  # the graph was real: it runs backward (and the hooks in it)
    return sum(storages.values())


def _worker(rank, world_size, args):
    from loop_megatron.config import ModelConfig
    from loop_megatron.model import LoopGPT
    from loop_megatron.parallel import destroy_model_parallel, initialize_model_parallel

    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    rows = []
    for ckpt in CHECKPOINTING:
        row = {"checkpointing": ckpt}
        for loops in (args.loops[0], args.loops[1]):
            cfg = ModelConfig(vocab_size=args.vocab, make_vocab_size_divisible_by=1, max_position_embeddings=args.seq,
                              hidden_size=args.hidden, num_attention_heads=8, num_layers=2, num_loops=loops,
                              prelude_layers=1, coda_layers=1, loop_gates="vector", activation_checkpointing=ckpt)
            for name, tp, sp in (("tp1", 1, False), ("tp2", 2, False), ("tp2_sp", 2, True)):
                destroy_model_parallel()
                initialize_model_parallel(tp)
                torch.manual_seed(1)
                model = LoopGPT(cfg).train()
                if sp:
                    model.enable_sequence_parallel()
                row[name, loops] = saved_bytes(model, ids)
        rows.append(row)
    destroy_model_parallel()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--loops", type=int, nargs=2, default=[2, 6], metavar=("FEW", "MANY"))
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    per_rank = run_distributed(_worker, 2, args)
    few, many = args.loops
    print(f"saved-for-backward MiB per rank (the larger rank; one hidden state B x T x d fp32 = "
          f"{args.batch * args.seq * args.hidden * 4 / 2**20:.2f} MiB), d={args.hidden}, 1 prelude + 2 layers x "
          f"{many} loops + 1 coda, batch {args.batch} x seq {args.seq}, vocab {args.vocab}; 'per loop' = (total at "
          f"{many} loops - total at {few}) / {many - few}:\n")
    print("| checkpointing | TP=1 | TP=2 | TP=2 + SP | SP / TP=2 | per loop: TP=1 | TP=2 | TP=2 + SP |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r0, r1 in zip(*per_rank):
        mib = {key: max(r0[key], r1[key]) / 2**20 for key in r0 if key != "checkpointing"}
        total = [mib[name, many] for name in ("tp1", "tp2", "tp2_sp")]
        slope = [(mib[name, many] - mib[name, few]) / (many - few) for name in ("tp1", "tp2", "tp2_sp")]
        print(f"| {r0['checkpointing']} | " + " | ".join(f"{v:.1f}" for v in total) + f" | {total[2] / total[1]:.2f} | "
              + " | ".join(f"{v:.2f}" for v in slope) + " |")


if __name__ == "__main__":
    main()
