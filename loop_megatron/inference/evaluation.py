"""Held-out loss, perplexity and bits per byte of a checkpoint, optionally versus the number of loops.

Looped models can be run with more (or fewer) iterations than they were trained with (iterations beyond
the trained count reuse the last gate); `evaluate_checkpoint(..., loops=[1, 2, 4])` measures the same
held-out samples at each count, on every named set (`valid_data_path`, or the valid/test split of
`data_path`). Bits per byte count the UTF-8 bytes of the targets with the checkpoint's tokenizer
(data/bpb.py). Single process, TP=1.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..utils import fs

IGNORE = -100


@dataclass
class EvalResult:
    loops: int
    loss: float
    perplexity: float
    tokens: int
    batches: int
    bpb: Optional[float] = None
    """Bits per byte of the text targets (None without a tokenizer's byte lengths)."""
    bytes: Optional[int] = None
    name: str = "valid"
    """The evaluation set."""


def _batches(dataset, micro_batch_size: int, eval_iters: Optional[int]):
    n = len(dataset)
    if eval_iters is not None and eval_iters > 0:
        n = min(n, eval_iters * micro_batch_size)
    for start in range(0, n, micro_batch_size):
        items = [dataset[i]["tokens"] for i in range(start, min(n, start + micro_batch_size))]
        yield torch.stack([torch.as_tensor(t, dtype=torch.long) for t in items])


@torch.no_grad()
def evaluate(model, dataset, micro_batch_size: int = 8, eval_iters: Optional[int] = None,
             num_loops: Optional[int] = None, byte_lengths=None, name: str = "valid") -> EvalResult:
    """Token-weighted mean cross-entropy over the first `eval_iters` micro-batches of `dataset` (all of it
    when None), and bits per byte when `byte_lengths` (the tokenizer's ``token_byte_lengths()``) is given.
    Items are {"tokens": [seq_length + 1]}: inputs tokens[:-1], labels tokens[1:]."""
    from ..data.bpb import bits_per_byte, bpb_sums

    device = next(model.parameters()).device
    lengths = None if byte_lengths is None else torch.as_tensor(byte_lengths, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nats, text nats, bytes (summed on device)
    tokens, batches = 0, 0
    try:
        for batch in _batches(dataset, micro_batch_size, eval_iters):
            batch = batch.to(device)
            labels = batch[:, 1:]
            _, token_loss = model(batch[:, :-1], labels, num_loops=num_loops, return_logits=False,
                                  loss_reduction="none")
            token_loss = token_loss.double()
            sums[0] += token_loss.sum()
            if lengths is not None:
                nats, nbytes = bpb_sums(token_loss, labels, lengths)
                sums[1] += nats
                sums[2] += nbytes
            tokens += labels.numel()
            batches += 1
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError(f"the evaluation set {name!r} is empty.")
    total, text_nats, nbytes = sums.tolist()
    loss = total / tokens
    loops = num_loops or model.loop.num_loops
    bpb = bits_per_byte(text_nats, int(nbytes)) if lengths is not None else None
    return EvalResult(loops=loops, loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=tokens, batches=batches,
                      bpb=bpb, bytes=int(nbytes) if lengths is not None else None, name=name)


def build_eval_dataset(data_path: Sequence[str], split: str, seq_length: int, eval_split: str = "valid",
                       seed: int = 1234, cache_dir: Optional[str] = None):
    """One epoch of the valid or test split of `data_path` (Megatron prefixes, optionally weighted)."""
    from ..data.gpt_dataset import build_train_valid_test_datasets

    if eval_split not in ("valid", "test"):
        raise ValueError(f"eval split must be 'valid' or 'test', got {eval_split!r}.")
    wanted = (0, None, 0) if eval_split == "valid" else (0, 0, None)
    datasets = build_train_valid_test_datasets(list(data_path), split, seq_length, seed, wanted, cache_dir)
    ds = datasets[1] if eval_split == "valid" else datasets[2]
    if ds is None or len(ds) == 0:
        raise ValueError(f"{' '.join(data_path)}: split {split!r} gives the {eval_split} set no documents; "
                         f"use a split with a non-zero {eval_split} share, e.g. 949,50,1.")
    return ds


def build_eval_sets(data_path: Sequence[str], split: str, seq_length: int, eval_split: str = "valid",
                    seed: int = 1234, cache_dir: Optional[str] = None,
                    named: Optional[Sequence[str]] = None) -> "Dict[str, Any]":
    """``name -> dataset`` to evaluate: each named set (``NAME=PREFIX`` or ``PREFIX``) whole, or else
    the `eval_split` split of `data_path` under the name `eval_split`."""
    from ..data.gpt_dataset import build_named_eval_datasets, parse_named_data_paths

    if named:
        pairs = parse_named_data_paths(named, f"--{eval_split}-data-path")
        return dict(build_named_eval_datasets(pairs, seq_length, seed, None, cache_dir, eval_split))
    if not data_path:
        raise ValueError("nothing to evaluate: pass --data-path or --valid-data-path/--test-data-path.")
    return {eval_split: build_eval_dataset(data_path, split, seq_length, eval_split, seed, cache_dir)}


def evaluate_checkpoint(load: str, data_path: Sequence[str], split: str = "949,50,1", eval_split: str = "valid",
                        seq_length: Optional[int] = None, micro_batch_size: int = 8, eval_iters: Optional[int] = None,
                        loops: Optional[Sequence[int]] = None, tag: Optional[str] = None, seed: int = 1234,
                        cache_dir: Optional[str] = None, device: str = "cpu", named: Optional[Sequence[str]] = None,
                        tokenizer=None) -> Tuple[List[EvalResult], Dict[str, Any]]:
    """Load a checkpoint and evaluate it on every set once per entry of `loops` (default: its trained
    loop count), with bits per byte from `tokenizer` (default: the checkpoint's). The datasets are
    checked to be made by that tokenizer. Returns (results, checkpoint meta);
    meta["config"]["model"]["num_loops"] is the trained count."""
    from ..checkpoint import load_checkpoint, load_tokenizer
    from ..data.dataset_meta import check_dataset_tokenizer
    from ..data.gpt_dataset import parse_data_path, parse_named_data_paths
    from ..model import LoopGPT, load_full_state_dict

    cfg, sd, meta = load_checkpoint(load, tag)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(meta["path"], meta)
    prefixes = ([p for _, p in parse_named_data_paths(named, f"--{eval_split}-data-path")] if named
                else [p for _, p in parse_data_path(list(data_path))])
    for prefix in prefixes:
        check_dataset_tokenizer(prefix, tokenizer, cfg.model.vocab_size)
    model = LoopGPT(cfg.model)
    load_full_state_dict(model, sd)
    model = model.to(device).eval()
    seq_length = seq_length or min(cfg.data.seq_length, cfg.model.max_position_embeddings)
    if seq_length > cfg.model.max_position_embeddings:
        raise ValueError(f"--seq-length {seq_length} is longer than the model's max_position_embeddings "
                         f"({cfg.model.max_position_embeddings}).")
    sets = build_eval_sets(data_path, split, seq_length, eval_split, seed, cache_dir, named)
    lengths = tokenizer.token_byte_lengths()
    results = []
    for name, dataset in sets.items():
        for n in (list(loops) if loops else [cfg.model.num_loops]):
            if n < 1:
                raise ValueError(f"--loops values must be >= 1, got {n}.")
            results.append(evaluate(model, dataset, micro_batch_size, eval_iters, num_loops=n, byte_lengths=lengths,
                                    name=name))
    return results, meta


def markdown_table(results: Sequence[EvalResult], trained_loops: Optional[int] = None) -> str:
    """| set | loops | loss | perplexity | bpb | tokens | (the trained loop count marked with *)."""
    lines = ["| set | loops | loss | perplexity | bpb | tokens |", "|:---|---:|---:|---:|---:|---:|"]
    for r in results:
        mark = "*" if trained_loops is not None and r.loops == trained_loops else ""
        bpb = "-" if r.bpb is None else f"{r.bpb:.4f}"
        lines.append(f"| {r.name} | {r.loops}{mark} | {r.loss:.4f} | {r.perplexity:.2f} | {bpb} | {r.tokens} |")
    return "\n".join(lines)


def write_json(results: Sequence[EvalResult], path: str, **extra) -> None:
    data = dict(extra, results=[asdict(r) for r in results])
    fs.write_json(path, data, indent=2, make_parent=True)
