"""Generation with test-time compute: does an exit save the time its iterations say it should?

Trains (or reuses, from --cache-dir) a `tiny-recurrent` model in-process per vocabulary, on the bundled State of
the Union corpus (GPT-2's 50257-token vocabulary, and a small byte-level BPE trained here on the same text),
with the preset's sampled depth (Poisson-lognormal, mean 4, max 8, backprop through the last 2), then an exit
gate on the frozen model (Ouro's second stage) so that every criterion has something to read. Then, in one
process, on the same held-out prompts:

  speed    greedy generate() of --new-tokens after a --prompt-len prompt, batch 1 and 8, for fixed depths and
           each exit criterion (prefill with exits and at full depth), beside Hugging Face generate() of the
           exported model (the peer): ms per generated token (decode), prefill ms, tokens/s over the whole
           call, mean iterations of the generated tokens, peak KV-cache memory. Each setting runs --repeats
           times, interleaved, and its fastest run counts (the machine is shared: a ratio within one run is the
           measurement, an absolute time is not). "vs fixed" = decode time / that of the fixed depth ceil(m).
  quality  held-out bits per byte of the full-sequence forward at fixed depths and at each exit, and its
           difference from the cap depth, in percent.
  KV       for each KV option across iterations (all | first | last k), the cache's bytes after a generation
           and the held-out bpb of teacher-forced cached decoding at the cap (token by token, as generation
           reads the cache), beside 'all'.

    python bench/generation_bench.py                     # both vocabularies, ~15 min on 2 free cores (cap 8 = the preset's max_loops)
    python bench/generation_bench.py --vocab small --quick

Prints Markdown tables. Timings use --threads intra-op threads (default 1: steadier on a loaded machine).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loop_megatron.config import preset  # noqa: E402
from loop_megatron.data.bpb import bits_per_byte  # noqa: E402
from loop_megatron.data.corpus import iter_sotu_documents  # noqa: E402
from loop_megatron.inference.evaluation import evaluate  # noqa: E402
from loop_megatron.inference.generation import GenerationStats, generate  # noqa: E402
from loop_megatron.model import KVCache, LoopDepth, LoopGPT, full_state_dict  # noqa: E402
from loop_megatron.model.exit import ExitRule, configure_exit_training  # noqa: E402
from loop_megatron.training.loop_depth import LoopDepthSampler  # noqa: E402

HELD_OUT_DOCS = 12
# Exit thresholds per criterion (delta: relative change of the state; entropy in nats; gate: probability).
# entropy: fractions of ln(vocabulary size), so that one list serves both vocabularies.
THRESHOLDS = {"delta": [0.4, 0.3, 0.2], "kl": [0.01, 0.001], "entropy": [0.7, 0.8], "gate": [0.5, 0.8]}
KV_OPTIONS = [("all", 1), ("first", 1), ("last", 1), ("last", 2), ("last", 4)]


# ----------------------------------------------------------------------------------------------------
# Data, tokenizers, the model
# ----------------------------------------------------------------------------------------------------
def corpus() -> Tuple[List[str], List[str]]:
    docs = [d["text"] for d in iter_sotu_documents()]
    return docs[HELD_OUT_DOCS:], docs[:HELD_OUT_DOCS]


def tokenizer_for(vocab: str, train_docs: List[str], cache_dir: str, small_vocab: int):
    from loop_megatron.data.tokenizer import GPT2Tokenizer, HuggingFaceTokenizer

    if vocab == "gpt2":
        return GPT2Tokenizer()
    folder = os.path.join(cache_dir, f"bpe{small_vocab}")
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        from loop_megatron.data.tokenizer_training import train_bpe_tokenizer

        os.makedirs(cache_dir, exist_ok=True)
        jsonl = os.path.join(cache_dir, "train_docs.jsonl")
        with open(jsonl, "w", encoding="utf-8") as f:
            for text in train_docs:
                f.write(json.dumps({"text": text}) + "\n")
        train_bpe_tokenizer([jsonl], small_vocab, folder, progress=False)
    return HuggingFaceTokenizer(os.path.join(folder, "tokenizer.json"))


def token_stream(tok, docs: List[str]) -> torch.Tensor:
    ids: List[int] = []
    for text in docs:
        ids += tok.encode(text) + [tok.eod]
    return torch.tensor(ids, dtype=torch.long)


def model_config(tok):
    cfg = preset("tiny-recurrent")
    cfg.model.vocab_size = tok.vocab_size
    cfg.model.exit_gate = True
    return cfg


def train(cfg, stream: torch.Tensor, steps: int, seq: int, batch: int, gate_steps: int, seed: int) -> LoopGPT:
    """The preset's recipe in-process: AdamW, warmup + cosine, sampled depth with truncated backprop; then
    `gate_steps` of exit-gate-only training (the rest frozen)."""
    torch.manual_seed(seed)
    cfg.training.train_iters = steps
    model = LoopGPT(cfg.model)
    sampler = LoopDepthSampler(cfg)
    t = cfg.training
    gen = torch.Generator().manual_seed(seed)

    def batch_of():
        starts = torch.randint(0, stream.numel() - seq - 1, (batch,), generator=gen)
        window = torch.stack([stream[s:s + seq + 1] for s in starts.tolist()])
        return window[:, :-1], window[:, 1:]

    model.exit_entropy_beta = 0.0
    params = [p for n, p in model.named_parameters() if not n.startswith("exit_gate.")]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    for it in range(steps):
        warm = min(1.0, (it + 1) / max(1, t.lr_warmup_iters))
        cosine = t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * it / steps))
        for g in opt.param_groups:
            g["lr"] = t.lr * warm if it < t.lr_warmup_iters else cosine
        x, y = batch_of()
        depth = LoopDepth(sampler.step_loops(it), t.backprop_loops)
        exit_gate = model.exit_gate
        model.exit_gate = None  # the LM objective alone (the gate is trained afterwards)
        _, loss = model(x, y, depth=depth)
        model.exit_gate = exit_gate
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if it % 50 == 0 or it == steps - 1:
            print(f"  step {it:4d} loss {loss.item():.3f} loops {depth.num_loops}", file=sys.stderr, flush=True)
    configure_exit_training(model, 0.01, gate_only=True)
    gate_opt = torch.optim.AdamW(model.exit_gate.parameters(), lr=1e-2)
    for it in range(gate_steps):
        x, y = batch_of()
        _, loss = model(x[:, :32], y[:, :32], depth=cfg.training.max_loops)
        gate_opt.zero_grad(set_to_none=True)
        loss.backward()
        gate_opt.step()
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def load_or_train(vocab: str, args, train_docs: List[str]):
    tok = tokenizer_for(vocab, train_docs, args.cache_dir, args.small_vocab)
    cfg = model_config(tok)
    path = os.path.join(args.cache_dir, f"model-{vocab}-{args.steps}-{args.train_seq}-{args.seed}.pt")
    if os.path.isfile(path):
        model = LoopGPT(cfg.model)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=False)
        return tok, cfg, model.eval()
    print(f"training tiny-recurrent ({vocab} vocabulary, {tok.vocab_size} tokens, {args.steps} steps)",
          file=sys.stderr, flush=True)
    model = train(cfg, token_stream(tok, train_docs), args.steps, args.train_seq, 8, args.gate_steps, args.seed)
    os.makedirs(args.cache_dir, exist_ok=True)
    torch.save(model.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    return tok, cfg, model


# ----------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------
def held_out(tok, docs: List[str], seq: int, count: int) -> torch.Tensor:
    stream = token_stream(tok, docs)
    n = min(count, stream.numel() // (seq + 1))
    return stream[:n * (seq + 1)].view(n, seq + 1)


def bpb_of(model, windows: torch.Tensor, byte_lengths, cap: int, criterion: str = "none",
           threshold: Optional[float] = None) -> Tuple[float, float]:
    """(bpb, mean iterations) of the full-sequence forward."""
    data = [{"tokens": w} for w in windows]
    res = evaluate(model, data, micro_batch_size=8, num_loops=cap, exit_criterion=criterion,
                   exit_threshold=threshold, byte_lengths=byte_lengths)
    return res.bpb, res.mean_iterations or float(cap)


@torch.no_grad()
def cached_bpb(model, windows: torch.Tensor, byte_lengths, cap: int, kv_share: str, kv_budget: int,
               prompt: int) -> float:
    """bpb of teacher-forced cached decoding at the cap: the first `prompt` tokens in one forward, then one
    token per forward, every prediction after the prompt scored."""
    lengths = torch.as_tensor(byte_lengths, dtype=torch.long)
    rule = ExitRule("none", kv_share=kv_share, kv_budget=kv_budget)
    nats, nbytes = 0.0, 0
    for start in range(0, windows.shape[0], 8):
        w = windows[start:start + 8]
        x, y = w[:, :-1], w[:, 1:]
        cache = KVCache(capacity=x.shape[1])
        steps = [model(x[:, :prompt], depth=cap, exit_rule=rule, kv_cache=cache)[0][:, -1:]]
        for t in range(prompt, x.shape[1]):
            steps.append(model(x[:, t:t + 1], depth=cap, exit_rule=rule, kv_cache=cache)[0])
        logits = torch.cat(steps, dim=1)[:, :-1]  # predictions of y[:, prompt - 1:]
        target = y[:, prompt - 1:x.shape[1] - 1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                                reduction="sum")
        nats += float(nll)
        nbytes += int(lengths[target].sum())
    return bits_per_byte(nats, nbytes)


class Setting:
    """One generation setting and the fastest of its runs."""

    def __init__(self, label: str, **kw):
        self.label, self.kw = label, kw
        self.best: Optional[Dict[str, float]] = None
        self.tokens: Optional[torch.Tensor] = None

    def run(self, model, prompts: torch.Tensor, new: int):
        stats = GenerationStats()
        started = time.perf_counter()
        out, its = generate(model, prompts, max_new_tokens=new, temperature=0, return_iterations=True,
                            stats=stats, **self.kw)
        total = time.perf_counter() - started
        B, P = prompts.shape
        row = dict(decode_ms=1e3 * stats.decode_seconds / max(1, stats.decode_steps),
                   prefill_ms=1e3 * stats.prefill_seconds, tok_s=B * new / total,
                   iterations=float(its[:, P:].float().mean()), kv_mib=stats.kv_cache_bytes / 2 ** 20)
        if self.best is None or row["decode_ms"] < self.best["decode_ms"]:
            keep = self.best
            self.best = row
            if keep is not None:  # the prefill's own fastest run
                self.best["prefill_ms"] = min(keep["prefill_ms"], row["prefill_ms"])
        elif row["prefill_ms"] < self.best["prefill_ms"]:
            self.best["prefill_ms"] = row["prefill_ms"]
        self.tokens = out


class PeerSetting(Setting):
    """Hugging Face generate() of the exported model (greedy, with its DynamicCache)."""

    def run(self, hf, prompts: torch.Tensor, new: int):
        started = time.perf_counter()
        with torch.no_grad():
            res = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
                              **self.kw)
        total = time.perf_counter() - started
        cache = getattr(res, "past_key_values", None) or getattr(res, "cache", None)
        kv = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers) if cache else 0
        row = dict(decode_ms=1e3 * total / new, prefill_ms=float("nan"), tok_s=prompts.shape[0] * new / total,
                   iterations=float(self.kw.get("num_loops", 0)), kv_mib=kv / 2 ** 20)
        if self.best is None or row["decode_ms"] < self.best["decode_ms"]:
            self.best = row
        self.tokens = res.sequences


def export_peer(model, cfg, tok, folder: str):
    from transformers import AutoModelForCausalLM

    from loop_megatron.hf.convert import export_to_hf

    export_to_hf(full_state_dict(model), cfg, folder, overwrite=True, tokenizer=tok)
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


def speed_table(vocab, model, cfg, tok, hf, windows, args, exits) -> List[str]:
    """Markdown rows of the speed table for batch 1 and 8."""
    cap = args.cap
    lines = []
    for batch in (1, 8):
        prompts = windows[:batch, :args.prompt_len]
        fixed_depths = sorted({1, 2, 3, 4, 6, cap})
        settings = [Setting(f"fixed {d}", num_loops=d, exit_criterion="none") for d in fixed_depths]
        for criterion, threshold in exits:
            for prefill in ("exit", "full"):
                settings.append(Setting(f"{criterion} < {threshold:g}, prefill {prefill}", num_loops=cap,
                                        exit_criterion=criterion, exit_threshold=threshold, prefill=prefill))
        peers = [PeerSetting(f"HF generate(), fixed {d}", num_loops=d) for d in (cfg.model.num_loops, cap)]
        for _ in range(args.repeats):
            for s in settings:
                s.run(model, prompts, args.new_tokens)
            for p in peers:
                p.run(hf, prompts, args.new_tokens)
        by_depth = {d: s.best["decode_ms"] for d, s in zip(fixed_depths, settings)}
        for s in settings + peers:
            b = s.best
            m = b["iterations"]
            ref = min([d for d in by_depth if d >= math.ceil(m - 1e-9)] or [cap])
            ratio = b["decode_ms"] / by_depth[ref]
            same = ""
            if isinstance(s, PeerSetting):
                ours = next(x for x in settings if x.kw.get("num_loops") == s.kw["num_loops"]
                            and x.kw.get("exit_criterion") == "none")
                same = "same tokens" if torch.equal(ours.tokens, s.tokens) else "tokens differ"
            prefill_ms = "–" if math.isnan(b["prefill_ms"]) else f"{b['prefill_ms']:.1f}"
            lines.append(f"| {vocab} | {batch} | {s.label} | {m:.2f} | {b['decode_ms']:.2f} | {prefill_ms} | "
                         f"{b['tok_s']:.0f} | {b['kv_mib']:.2f} | {ratio:.2f} (fixed {ref}) {same} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", nargs="+", default=["gpt2", "small"], choices=["gpt2", "small"])
    p.add_argument("--small-vocab", type=int, default=512)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--gate-steps", type=int, default=40)
    p.add_argument("--seq", type=int, default=128, help="held-out window length")
    p.add_argument("--train-seq", type=int, default=64)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cap", type=int, default=8, help="loop cap of the exits (default: the preset's max_loops)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--held-out", type=int, default=16, help="held-out windows of --seq + 1 tokens")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "loop_megatron_genbench"))
    p.add_argument("--quick", action="store_true", help="fewer settings and repeats (a smoke run)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.held_out, args.new_tokens = 1, 8, 32
    train_docs, test_docs = corpus()
    speed, quality, kv_rows = [], [], []
    for vocab in args.vocab:
        tok, cfg, model = load_or_train(vocab, args, train_docs)
        lengths = tok.token_byte_lengths()
        windows = held_out(tok, test_docs, args.seq, args.held_out)
        cap = args.cap
        cap_bpb, _ = bpb_of(model, windows, lengths, cap)
        for d in sorted({1, 2, 3, 4, 6, 8, 2 * cap}):
            b, _ = bpb_of(model, windows, lengths, d)
            quality.append(f"| {vocab} | fixed {d} | {d} | {b:.4f} | {100 * (b / cap_bpb - 1):+.2f}% |")
        exits = []
        for criterion, thresholds in THRESHOLDS.items():
            for t in (thresholds[:1] if args.quick else thresholds):
                if criterion == "entropy":
                    t = round(t * math.log(tok.vocab_size), 2)
                b, m = bpb_of(model, windows, lengths, cap, criterion, t)
                quality.append(f"| {vocab} | {criterion} < {t:g} | {m:.2f} | {b:.4f} | {100 * (b / cap_bpb - 1):+.2f}% |")
                exits.append((criterion, t))
        print("\n".join(quality[-(len(exits) + 6):]), file=sys.stderr, flush=True)
        hf = export_peer(model, cfg, tok, os.path.join(args.cache_dir, f"hf-{vocab}"))
        speed += speed_table(vocab, model, cfg, tok, hf, windows, args, exits)
        print("\n".join(speed[-4:]), file=sys.stderr, flush=True)
        kv_windows = windows[:8]
        for share, budget in KV_OPTIONS:
            stats = GenerationStats()
            generate(model, windows[:8, :args.prompt_len], max_new_tokens=args.new_tokens, temperature=0,
                     num_loops=cap, kv_share=share, kv_budget=budget, stats=stats)
            b = cached_bpb(model, kv_windows, lengths, cap, share, budget, args.prompt_len)
            name = share if share != "last" else f"last {budget}"
            kv_rows.append((vocab, name, stats.kv_cache_bytes, b))
    print(f"\n### Generation speed (tiny-recurrent, cap {args.cap}, {args.prompt_len}-token prompts, "
          f"{args.new_tokens} new tokens, greedy, {args.threads} thread(s), fastest of {args.repeats})\n")
    print("| vocab | batch | setting | mean iterations | decode ms / token | prefill ms | tokens/s | KV MiB | "
          "decode vs fixed ceil(m) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---|")
    print("\n".join(speed))
    print(f"\n### Held-out quality (full-sequence forward, cap {args.cap}; Δ vs the cap depth)\n")
    print("| vocab | setting | mean iterations | bpb | Δ bpb |")
    print("|---|---|---:|---:|---:|")
    print("\n".join(quality))
    print(f"\n### KV across iterations (batch 8, fixed depth {args.cap}; bpb of cached teacher-forced decoding)\n")
    print("| vocab | KV option | KV MiB after generation | vs all | cached bpb | Δ bpb vs all |")
    print("|---|---|---:|---:|---:|---:|")
    for vocab, name, nbytes, b in kv_rows:
        base = next(r for r in kv_rows if r[0] == vocab and r[1] == "all")
        print(f"| {vocab} | {name} | {nbytes / 2 ** 20:.2f} | {nbytes / base[2]:.2f}x | {b:.4f} | "
              f"{100 * (b / base[3] - 1):+.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
