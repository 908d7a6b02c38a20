"""Activation memory per rank with and without sequence parallelism (--sequence-parallel), on 2 gloo processes.

What is measured: the bytes of the tensors autograd keeps from the forward for the backward, per rank. Every
tensor saved for backward during one training-mode forward (the loss included) is seen through
torch.autograd.graph.saved_tensors_hooks, counted once per storage (views and tensors saved twice share one),
parameters excluded. Non-reentrant activation checkpointing saves its inputs through the same hooks and
recomputes the rest in the backward, so with checkpointing this is what stays alive between forward and
backward; the transient activations of the iteration being recomputed are not counted (they are one
iteration's worth, alike with and without SP, at the peak of the backward). No allocator is involved: on the
CPU there is no peak-allocated counter, so this counts bytes, not the process's memory.

Layouts: TP=1 (one full replica per rank), TP=2, TP=2 with SP; the model: d=256, 8 heads, 2 shared layers x 4
loops with vector gates, one prelude and one coda layer, vocab 4096, micro batch 4 x seq 256, fp32. One hidden
state (B x T x d fp32) is 1 MiB at TP=1.

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
        cfg = ModelConfig(vocab_size=args.vocab, make_vocab_size_divisible_by=1, max_position_embeddings=args.seq,
                          hidden_size=args.hidden, num_attention_heads=8, num_layers=2, num_loops=args.loops,
                          prelude_layers=1, coda_layers=1, loop_gates="vector", activation_checkpointing=ckpt)
        row = {"checkpointing": ckpt}
        for name, tp, sp in (("tp1", 1, False), ("tp2", 2, False), ("tp2_sp", 2, True)):
            destroy_model_parallel()
            initialize_model_parallel(tp)
            torch.manual_seed(1)
            model = LoopGPT(cfg).train()
            if sp:
                model.enable_sequence_parallel()
            row[name] = saved_bytes(model, ids)
        rows.append(row)
    destroy_model_parallel()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    per_rank = run_distributed(_worker, 2, args)
    hidden = args.batch * args.seq * args.hidden * 4
    print(f"saved-for-backward bytes per rank (MiB; one hidden state B x T x d fp32 = {hidden / 2**20:.2f} MiB), "
          f"d={args.hidden}, 1 prelude + 2 layers x {args.loops} loops + 1 coda, batch {args.batch} x seq "
          f"{args.seq}, vocab {args.vocab}:\n")
    print("| checkpointing | TP=1 | TP=2 | TP=2 + SP | SP / TP=2 |")
    print("|---|---:|---:|---:|---:|")
    for r0, r1 in zip(*per_rank):
        tp1 = r0["tp1"] / 2**20
        tp2, sp = max(r0["tp2"], r1["tp2"]) / 2**20, max(r0["tp2_sp"], r1["tp2_sp"]) / 2**20
        print(f"| {r0['checkpointing']} | {tp1:.1f} | {tp2:.1f} | {sp:.1f} | {sp / tp2:.2f} |")


if __name__ == "__main__":
    main()
