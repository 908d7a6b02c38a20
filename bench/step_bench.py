#!/usr/bin/env python
"""The trainer's training step against a minimal plain-PyTorch training loop at identical settings.

    python bench/step_bench.py [--rounds 4] [--steps 5] [--threads 2] [--cases tiny tiny-loop block block-loop]
    python bench/step_bench.py --profile [--cases tiny]      # torch.profiler: top ops, ours vs reference

"ours" is the trainer's real step: the engine from `loop_megatron.training.engine.build_engine` (LoopGPT,
DeepSpeed ZeRO-0, TP=1, fp32, one process) stepped by `loop_megatron.training.step.train_step`, the
function `pretrain` calls every iteration. "reference" is written out below with nothing from the
package: a nanoGPT-style GPT-2 (pre-LN blocks, GELU-tanh MLP, SDPA causal attention, learned positions,
tied embeddings, the exact vocabulary), the same loop with per-iteration vector gates when looped,
torch.optim.AdamW with the same hyper-parameters and decay groups, clip_grad_norm_ at 1.0, and one
loss.item() per step. Both see the same random token batches.

The two alternate (ours, reference, ours, reference, ...; the order flips every round) so that load
from other processes on a shared machine falls on both; each run times --steps steps after one warm-up
step; the table shows the median over rounds of each run's mean. ratio = reference ms / our ms
(= our tokens/s over the reference's): >= 1.0 means the trainer's machinery costs nothing measurable;
"best runs" is the same ratio from each side's fastest run (the one least disturbed by other load).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# name: (layers, loops, hidden, heads, seq, micro batch, vocab)
CASES = {
    "tiny": (2, 1, 128, 4, 128, 8, 50257),
    "tiny-loop": (1, 2, 128, 4, 128, 8, 50257),
    "block": (4, 1, 256, 4, 256, 8, 8192),
    "block-loop": (1, 2, 256, 4, 256, 8, 8192),
}
LR, BETAS, EPS, WD, CLIP = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0


# ----------------------------------------------------------------------------------------------------
# The reference: a minimal single-file GPT-2 training loop (nothing from loop_megatron).
# ----------------------------------------------------------------------------------------------------
class RefBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class RefGPT(nn.Module):
    def __init__(self, layers, loops, d, heads, seq, vocab):
        super().__init__()
        self.loops = loops
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList([RefBlock(d, heads) for _ in range(layers)])
        self.gates = nn.Parameter(torch.ones(loops, d)) if loops > 1 else None
        self.ln_f = nn.LayerNorm(d)
        for name, p in self.named_parameters():
            if p.ndim == 2 and name != "gates":
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for n in range(self.loops):
            h = x
            for block in self.blocks:
                h = block(h)
            x = h if self.gates is None else x + self.gates[n] * (h - x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


class Reference:
    def __init__(self, case):
        layers, loops, d, heads, seq, micro, vocab = case
        torch.manual_seed(0)
        self.model = RefGPT(layers, loops, d, heads, seq, vocab)
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and n != "gates"]
        keep = [p for n, p in self.model.named_parameters() if p.ndim < 2 or n == "gates"]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": keep, "weight_decay": 0.0}],
                                     lr=LR, betas=BETAS, eps=EPS)
        self.it = 0

    def step(self, tokens):
        x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        for g in self.opt.param_groups:
            g["lr"] = LR * min(1.0, (self.it + 1) / 10)
        loss = self.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.it += 1
        return loss.item()


# ----------------------------------------------------------------------------------------------------
# Ours: the trainer's engine and step.
# ----------------------------------------------------------------------------------------------------
class Ours:
    def __init__(self, case):
        from loop_megatron.config import Config
        from loop_megatron.model import LoopGPT
        from loop_megatron.training.engine import build_engine

        layers, loops, d, heads, seq, micro, vocab = case
        cfg = Config()
        m = cfg.model
        m.vocab_size, m.hidden_size, m.num_attention_heads = vocab, d, heads
        m.num_layers, m.num_loops, m.max_position_embeddings = layers, loops, seq
        m.loop_gates = "vector" if loops > 1 else "none"
        cfg.data.seq_length = seq
        t = cfg.training
        t.micro_batch_size, t.zero_stage, t.precision = micro, 0, "fp32"
        t.lr, t.adam_beta1, t.adam_beta2, t.adam_eps, t.weight_decay, t.clip_grad = LR, *BETAS, EPS, WD, CLIP
        t.lr_warmup_iters, t.train_iters = 10, 10 ** 6
        torch.manual_seed(0)
        self.engine, self.clipper, _ = build_engine(cfg, LoopGPT(m), 1, "fp32", log=lambda s: None)
        self.device = torch.device("cpu")

    def step(self, tokens):
        from loop_megatron.training.step import train_step

        return train_step(self.engine, iter((tokens,)), 1, self.device, self.clipper).loss


# ----------------------------------------------------------------------------------------------------
def timed(runner, batches, steps):
    runner.step(batches[0])  # warm-up (allocator, first-call paths)
    t0 = time.perf_counter()
    for i in range(steps):
        runner.step(batches[(i + 1) % len(batches)])
    return (time.perf_counter() - t0) / steps


def profile_table(runners, batches, steps, top, repeats=2):
    """Self CPU time per step of the top ops of each runner, as one Markdown table. The runners are
    profiled alternately `repeats` times and each op keeps its smallest time (the least disturbed by
    other load); calls per step do not depend on load."""
    from torch.profiler import ProfilerActivity, profile

    per = {name: {} for name in runners}
    calls = {name: {} for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            runner.step(batches[0])
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for i in range(steps):
                    runner.step(batches[(i + 1) % len(batches)])
            for e in prof.key_averages():
                ms = e.self_cpu_time_total / 1000.0 / steps
                per[name][e.key] = min(ms, per[name].get(e.key, ms))
                calls[name][e.key] = e.count / steps
    names = list(runners)
    keys = set()
    for name in names:
        keys.update(sorted(per[name], key=per[name].get, reverse=True)[:top])
    rows = sorted(keys, key=lambda k: -max(per[n].get(k, 0.0) for n in names))
    lines = ["| op (self CPU) | " + " | ".join(f"{n} ms/step | {n} calls/step" for n in names) + " |",
             "|---|" + "---:|---:|" * len(names)]
    for k in rows:
        lines.append(f"| `{k}` | " + " | ".join(f"{per[n].get(k, 0.0):.1f} | {calls[n].get(k, 0):g}" for n in names)
                     + " |")
    lines.append("| **all ops** | " + " | ".join(f"**{sum(per[n].values()):.1f}** | {sum(calls[n].values()):g}"
                                              for n in names) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--rounds", type=int, default=4, help="alternating runs per side")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="print the top-ops table instead of timing")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from loop_megatron.parallel import initialize_model_parallel
    from loop_megatron.training.distributed import init_distributed

    init_distributed()
    initialize_model_parallel(1)

    if not args.profile:
        print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} alternating rounds x "
              f"{args.steps} steps per side, fp32\n")
        print("| case | layers x loops | d | seq | micro | vocab | ours ms/step | reference ms/step | "
              "ours tokens/s | reference tokens/s | ratio ours/ref | ratio, best runs |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.cases:
        case = CASES[name]
        layers, loops, d, heads, seq, micro, vocab = case
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, vocab, (micro, seq + 1), generator=gen) for _ in range(4)]
        runners = {"ours": Ours(case), "reference": Reference(case)}
        if args.profile:
            print(f"\n**{name}** ({layers} layers x {loops} loops, d={d}, seq {seq}, micro {micro}, vocab {vocab}), "
                  f"{args.steps} profiled steps:\n")
            print(profile_table(runners, batches, args.steps, args.top))
            continue
        times = {k: [] for k in runners}
        for r in range(args.rounds):
            order = list(runners) if r % 2 == 0 else list(runners)[::-1]
            for k in order:
                times[k].append(timed(runners[k], batches, args.steps))
        ours, ref = statistics.median(times["ours"]), statistics.median(times["reference"])
        tok = micro * seq
        print(f"| {name} | {layers} x {loops} | {d} | {seq} | {micro} | {vocab} | {ours * 1e3:.0f} | {ref * 1e3:.0f} | "
              f"{tok / ours:,.0f} | {tok / ref:,.0f} | {ref / ours:.2f} | {min(times['reference']) / min(times['ours']):.2f} |",
              flush=True)
        del runners


if __name__ == "__main__":
    main()
