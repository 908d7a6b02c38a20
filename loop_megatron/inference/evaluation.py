"""Held-out loss and perplexity of a checkpoint, optionally as a function of the number of loops.

Looped models can be run with more (or fewer) iterations than they were trained with (iterations beyond
the trained count reuse the last gate); `evaluate_checkpoint(..., loops=[1, 2, 4])` measures the same
held-out samples at each count. Single process, TP=1.
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


def _batches(dataset, micro_batch_size: int, eval_iters: Optional[int]):
    n = len(dataset)
    if eval_iters is not None and eval_iters > 0:
        n = min(n, eval_iters * micro_batch_size)
    for start in range(0, n, micro_batch_size):
        items = [dataset[i]["tokens"] for i in range(start, min(n, start + micro_batch_size))]
        yield torch.stack([torch.as_tensor(t, dtype=torch.long) for t in items])


@torch.no_grad()
def evaluate(model, dataset, micro_batch_size: int = 8, eval_iters: Optional[int] = None,
             num_loops: Optional[int] = None) -> EvalResult:
    """Token-weighted mean cross-entropy over the first `eval_iters` micro-batches of `dataset` (all of it
    when None). Items are {"tokens": [seq_length + 1]}: inputs tokens[:-1], labels tokens[1:]."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens, batches = 0.0, 0, 0
    try:
        for batch in _batches(dataset, micro_batch_size, eval_iters):
            batch = batch.to(device)
            _, loss = model(batch[:, :-1], batch[:, 1:], num_loops=num_loops, return_logits=False)
            n = batch[:, 1:].numel()
            total += float(loss) * n
            tokens += n
            batches += 1
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("the evaluation set is empty.")
    loss = total / tokens
    loops = num_loops or model.loop.num_loops
    return EvalResult(loops=loops, loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=tokens, batches=batches)


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


def evaluate_checkpoint(load: str, data_path: Sequence[str], split: str = "949,50,1", eval_split: str = "valid",
                        seq_length: Optional[int] = None, micro_batch_size: int = 8, eval_iters: Optional[int] = None,
                        loops: Optional[Sequence[int]] = None, tag: Optional[str] = None, seed: int = 1234,
                        cache_dir: Optional[str] = None, device: str = "cpu") -> Tuple[List[EvalResult], Dict[str, Any]]:
    """Load a checkpoint and evaluate it once per entry of `loops` (default: its trained loop count).
    Returns (results, checkpoint meta); meta["config"]["model"]["num_loops"] is the trained count."""
    from ..checkpoint import load_checkpoint
    from ..model import LoopGPT, load_full_state_dict

    cfg, sd, meta = load_checkpoint(load, tag)
    model = LoopGPT(cfg.model)
    load_full_state_dict(model, sd)
    model = model.to(device).eval()
    seq_length = seq_length or min(cfg.data.seq_length, cfg.model.max_position_embeddings)
    if seq_length > cfg.model.max_position_embeddings:
        raise ValueError(f"--seq-length {seq_length} is longer than the model's max_position_embeddings "
                         f"({cfg.model.max_position_embeddings}).")
    dataset = build_eval_dataset(data_path, split, seq_length, eval_split, seed, cache_dir)
    results = []
    for n in (list(loops) if loops else [cfg.model.num_loops]):
        if n < 1:
            raise ValueError(f"--loops values must be >= 1, got {n}.")
        results.append(evaluate(model, dataset, micro_batch_size, eval_iters, num_loops=n))
    return results, meta


def markdown_table(results: Sequence[EvalResult], trained_loops: Optional[int] = None) -> str:
    """| loops | loss | perplexity | tokens | (the trained loop count marked with *)."""
    lines = ["| loops | loss | perplexity | tokens |", "|---:|---:|---:|---:|"]
    for r in results:
        mark = "*" if trained_loops is not None and r.loops == trained_loops else ""
        lines.append(f"| {r.loops}{mark} | {r.loss:.4f} | {r.perplexity:.2f} | {r.tokens} |")
    return "\n".join(lines)


def write_json(results: Sequence[EvalResult], path: str, **extra) -> None:
    data = dict(extra, results=[asdict(r) for r in results])
    fs.write_json(path, data, indent=2, make_parent=True)
