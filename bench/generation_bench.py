"""Generation with test-time compute: does an exit save the time its iterations say it should, at what quality?

The model: a trained checkpoint (--load CKPT: loaded as tools/evaluate.py loads it, with its held-out sets,
the run's own or --valid-data-path), or else (--vocab) a `tiny-recurrent` model trained (or reused, from
--cache-dir) in-process per vocabulary, on the bundled State of the Union corpus (GPT-2's 50257-token
vocabulary, and a small byte-level BPE trained here on the same text), with the preset's sampled depth
(Poisson-lognormal, mean 4, max 8, backprop through the last 2), then an exit gate on the frozen model (Ouro's
second stage) so that every criterion has something to read. The cap (--cap) defaults to the deepest
training depth (a sampled depth's max_loops). Then, in one process, on the same held-out windows:

  quality  held-out bits per byte of the full-sequence forward at every fixed depth 1..cap (and 2 x cap) and at
           each exit, and its difference from the cap depth, in percent (lower bpb is better).
  speed    greedy generate() of --new-tokens after a --prompt-len prompt (the held-out windows' first tokens),
           batch 1 and 8, for every fixed depth 1..cap and each exit criterion (prefill with exits and at full
           depth), beside Hugging Face generate() of the exported model (the peer): ms per generated token
           (decode), prefill ms, tokens/s over the whole call, mean iterations of the generated tokens, peak
           KV-cache memory. Each setting runs --repeats times, interleaved, and its fastest run counts (the
           machine is shared: a ratio within one run is the measurement, an absolute time is not). "vs fixed"
           = decode time / that of the fixed depth ceil(m); the quality columns repeat the setting's Δ bpb and
           mark the exits within 1.25x of fixed ceil(m) and within +0.1% bpb of the cap (issue 27's bound).
  KV       for each KV option across iterations (all | first | last k), the cache's bytes after a generation
           and the held-out bpb of teacher-forced cached decoding at the cap (token by token, as generation
           reads the cache), beside 'all'.

    python bench/generation_bench.py                     # both vocabularies, ~15 min on 2 free cores
    python bench/generation_bench.py --vocab small --quick
    python bench/generation_bench.py --load checkpoints/study/rec-s1 --held-out 32 \\
        --thresholds kl=0.001,0.0003 delta=0.05,0.02 entropy=none

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


def speed_table(label, model, cfg, hf, windows, args, exits, quality) -> List[str]:
    """Markdown rows of the speed table for batch 1 and 8; `quality` maps a setting's key (fixed depth d, or
    (criterion, threshold)) to its held-out (bpb, mean iterations), the cap's under the key args.cap."""
    cap = args.cap
    cap_bpb = quality[cap][0]
    lines = []
    for batch in (1, 8):
        prompts = windows[:batch, :args.prompt_len]
        fixed_depths = list(range(1, cap + 1))  # every depth, so that "vs fixed ceil(m)" is exactly that
        settings = [Setting(f"fixed {d}", num_loops=d, exit_criterion="none") for d in fixed_depths]
        keys = list(fixed_depths)
        for criterion, threshold in exits:
            for prefill in (("exit", "full") if args.prefill == "both" else (args.prefill,)):
                settings.append(Setting(f"{criterion} < {threshold:g}, prefill {prefill}", num_loops=cap,
                                        exit_criterion=criterion, exit_threshold=threshold, prefill=prefill))
                keys.append((criterion, threshold))
        peer_depths = sorted({cfg.model.num_loops, cap})
        peers = [PeerSetting(f"HF generate(), fixed {d}", num_loops=d) for d in peer_depths] if hf else []
        keys += peer_depths if hf else []
        for _ in range(args.repeats):  # interleaved: every setting once per round, so load drifts hit all alike
            for s in settings:
                s.run(model, prompts, args.new_tokens)
            for p in peers:
                p.run(hf, prompts, args.new_tokens)
        by_depth = {d: s.best["decode_ms"] for d, s in zip(fixed_depths, settings)}
        for s, key in zip(settings + peers, keys):
            b = s.best
            m = b["iterations"]
            ref = min(cap, math.ceil(m - 1e-9))
            ratio = b["decode_ms"] / by_depth[ref]
            same = ""
            if isinstance(s, PeerSetting):
                ours = next(x for x in settings if x.kw.get("num_loops") == s.kw["num_loops"]
                            and x.kw.get("exit_criterion") == "none")
                same = ", same tokens" if torch.equal(ours.tokens, s.tokens) else ", tokens differ"
            delta = 100 * (quality[key][0] / cap_bpb - 1)
            both = "yes" if ratio <= 1.25 and delta <= 0.1 and isinstance(key, tuple) else ""
            prefill_ms = "–" if math.isnan(b["prefill_ms"]) else f"{b['prefill_ms']:.1f}"
            lines.append(f"| {label} | {batch} | {s.label} | {m:.2f} | {b['decode_ms']:.2f} | {prefill_ms} | "
                         f"{b['tok_s']:.0f} | {b['kv_mib']:.2f} | {ratio:.2f} (fixed {ref}{same}) | {delta:+.2f}% | "
                         f"{both} |")
    return lines


def parse_thresholds(items: List[str]) -> Dict[str, List[float]]:
    """--thresholds CRITERION=T1,T2 ... -> {criterion: [T1, T2]} (the criteria not named keep THRESHOLDS')."""
    out = dict(THRESHOLDS)
    for item in items:
        name, _, values = item.partition("=")
        if name not in THRESHOLDS or not values:
            raise SystemExit(f"generation_bench.py: error: --thresholds {item!r}: expected CRITERION=T1,T2,... with "
                             f"CRITERION one of {', '.join(THRESHOLDS)}.")
        try:
            out[name] = [float(v) for v in values.split(",")] if values != "none" else []
        except ValueError:
            raise SystemExit(f"generation_bench.py: error: --thresholds {item!r}: thresholds must be numbers.")
    return out


def loaded_model(args):
    """(label, tokenizer, config, model, held-out windows [N, seq + 1]) of the checkpoint --load: its held-out
    sets as tools/evaluate.py reads them (the run's own, or --valid-data-path), the first --held-out windows
    of each, interleaved (so that a batch of prompts mixes the sets)."""
    from loop_megatron.inference.evaluation import describe_data, load_for_evaluation

    ev = load_for_evaluation(args.load, tag=args.tag, named=args.valid_data_path, cache_dir=args.data_cache_path)
    per_set = [[torch.as_tensor(ds[i]["tokens"], dtype=torch.long) for i in range(min(len(ds), args.held_out))]
               for ds in ev.sets.values()]
    rows = [w for group in zip(*per_set) for w in group]  # round robin (as many from each set)
    print(f"{ev.meta['path']}: {describe_data(ev.meta['eval_data'])}; {len(rows)} windows "
          f"({len(rows) // len(per_set)} per set)", file=sys.stderr, flush=True)
    label = os.path.basename(os.path.normpath(args.load))
    return label, ev.tokenizer, ev.cfg, ev.model, torch.stack(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", nargs="+", default=None, choices=["gpt2", "small"],
                   help="train tiny-recurrent here with these vocabularies (default: both; not with --load)")
    p.add_argument("--load", default=None, metavar="CKPT",
                   help="bench a trained checkpoint instead (the --save folder or a tag folder), on its held-out sets")
    p.add_argument("--tag", default=None, help="--load's checkpoint tag (default: 'latest')")
    p.add_argument("--valid-data-path", nargs="+", default=None, metavar="NAME=PREFIX",
                   help="--load: the held-out sets (default: the run's own, as tools/evaluate.py)")
    p.add_argument("--data-cache-path", default=None, help="--load: folder for cached sample indices")
    p.add_argument("--small-vocab", type=int, default=512)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--gate-steps", type=int, default=40)
    p.add_argument("--seq", type=int, default=128, help="held-out window length (with --load: the run's)")
    p.add_argument("--train-seq", type=int, default=64)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cap", type=int, default=None,
                   help="loop cap of the exits (default: the deepest training depth, e.g. a sampled depth's max_loops)")
    p.add_argument("--thresholds", nargs="+", default=[], metavar="CRITERION=T1,T2",
                   help="exit thresholds per criterion ('none' drops it; default: " +
                        " ".join(f"{k}={','.join(map(str, v))}" for k, v in THRESHOLDS.items()) +
                        "; entropy's are fractions of ln(vocabulary size))")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--held-out", type=int, default=16,
                   help="held-out windows of --seq + 1 tokens (with --load: per held-out set)")
    p.add_argument("--no-peer", action="store_true", help="skip Hugging Face generate() of the export")
    p.add_argument("--prefill", choices=("exit", "full", "both"), default="both",
                   help="the exits' prefill policies to time (default both)")
    p.add_argument("--no-kv", action="store_true", help="skip the KV-across-iterations table")
    p.add_argument("--quality-only", action="store_true", help="the held-out quality table only (no timing)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "loop_megatron_genbench"))
    p.add_argument("--quick", action="store_true", help="fewer settings and repeats (a smoke run)")
    args = p.parse_args(argv)
    if args.load and args.vocab:
        p.error("pass --load (a trained checkpoint) or --vocab (train one here), not both")
    thresholds = parse_thresholds(args.thresholds)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.new_tokens = 1, 32
        args.held_out = min(args.held_out, 8)
    from loop_megatron.config import training_depth_bound

    if args.load:
        models = [loaded_model(args)]
    else:
        train_docs, test_docs = corpus()
        models = []
        for vocab in args.vocab or ["gpt2", "small"]:
            tok, cfg, model = load_or_train(vocab, args, train_docs)
            models.append((vocab, tok, cfg, model, held_out(tok, test_docs, args.seq, args.held_out)))
    cap_given = args.cap
    speed, quality_rows, kv_rows, caps = [], [], [], []
    for label, tok, cfg, model, windows in models:
        args.cap = cap = cap_given or training_depth_bound(cfg)
        caps.append(cap)
        lengths = tok.token_byte_lengths()
        quality: Dict[object, Tuple[float, float]] = {}
        for d in list(range(1, cap + 1)) + [2 * cap]:
            quality[d] = bpb_of(model, windows, lengths, d)
        exits = []
        for criterion, values in thresholds.items():
            if criterion == "gate" and getattr(model, "exit_gate", None) is None:
                continue  # a model without the learned exit gate
            for t in (values[:1] if args.quick else values):
                if criterion == "entropy":
                    t = round(t * math.log(tok.vocab_size), 2)
                quality[(criterion, t)] = bpb_of(model, windows, lengths, cap, criterion, t)
                exits.append((criterion, t))
        cap_bpb = quality[cap][0]
        for key, (b, m) in quality.items():
            name = f"fixed {key}" if isinstance(key, int) else f"{key[0]} < {key[1]:g}"
            quality_rows.append(f"| {label} | {name} | {m:.2f} | {b:.4f} | {100 * (b / cap_bpb - 1):+.2f}% |")
        print("\n".join(quality_rows[-len(quality):]), file=sys.stderr, flush=True)
        if args.quality_only:
            continue
        hf = None if args.no_peer else export_peer(model, cfg, tok, os.path.join(args.cache_dir, f"hf-{label}"))
        for d in ({cfg.model.num_loops, cap} if hf else ()):
            quality.setdefault(d, bpb_of(model, windows, lengths, d))
        speed += speed_table(label, model, cfg, hf, windows, args, exits, quality)
        print("\n".join(speed[-4:]), file=sys.stderr, flush=True)
        kv_windows = windows[:8]
        for share, budget in (() if args.no_kv else KV_OPTIONS):
            stats = GenerationStats()
            generate(model, windows[:8, :args.prompt_len], max_new_tokens=args.new_tokens, temperature=0,
                     num_loops=cap, kv_share=share, kv_budget=budget, stats=stats)
            b = cached_bpb(model, kv_windows, lengths, cap, share, budget, args.prompt_len)
            name = share if share != "last" else f"last {budget}"
            kv_rows.append((label, name, stats.kv_cache_bytes, b))
    caps_text = "/".join(str(c) for c in sorted(set(caps)))
    if speed:
        print(f"\n### Generation speed (cap {caps_text}, {args.prompt_len}-token prompts, {args.new_tokens} new tokens, "
              f"greedy, {args.threads} thread(s), fastest of {args.repeats}; Δ bpb: held-out, vs the cap depth)\n")
        print("| model | batch | setting | mean iterations | decode ms / token | prefill ms | tokens/s | KV MiB | "
              "decode vs fixed ceil(m) | Δ bpb | ≤ 1.25x and ≤ +0.1% |")
        print("|---|---:|---|---:|---:|---:|---:|---:|---|---:|---|")
        print("\n".join(speed))
    print(f"\n### Held-out quality (full-sequence forward, cap {caps_text}; Δ vs the cap depth)\n")
    print("| model | setting | mean iterations | bpb | Δ bpb |")
    print("|---|---|---:|---:|---:|")
    print("\n".join(quality_rows))
    if kv_rows:
        print(f"\n### KV across iterations (batch 8, fixed depth = the cap; bpb of cached teacher-forced decoding)\n")
        print("| model | KV option | KV MiB after generation | vs all | cached bpb | Δ bpb vs all |")
        print("|---|---|---:|---:|---:|---:|")
        for label, name, nbytes, b in kv_rows:
            base = next(r for r in kv_rows if r[0] == label and r[1] == "all")
            print(f"| {label} | {name} | {nbytes / 2 ** 20:.2f} | {nbytes / base[2]:.2f}x | {b:.4f} | "
                  f"{100 * (b / base[3] - 1):+.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
