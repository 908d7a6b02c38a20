"""Held-out loss, perplexity and bits per byte of a checkpoint, as a function of test-time compute.

Looped models can be run with more (or fewer) iterations than they were trained with (iterations beyond
the trained count reuse the last gate); `evaluate_checkpoint(..., loops=[1, 2, 4])` measures the same
held-out samples at each count (the fixed-depth sweep), on every named set (`valid_data_path`, or the
valid/test split of `data_path`). With an exit criterion (model/exit.py: kl, entropy, gate) and several
thresholds it also measures, per threshold, the mean loop iterations per token that the adaptive exit used
and the loss at that average compute: the test-time compute curve, which `tools/evaluate.py --plot` draws
beside the fixed-depth sweep (experiments/plots.py). Bits per byte count the UTF-8 bytes of the targets
with the checkpoint's tokenizer (data/bpb.py). Answer-masked sets (data/loss_mask.py) count only the targets
their mask marks, in the loss, the token count and the bytes. Single process, TP=1.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..utils import fs

IGNORE = -100


@dataclass
class EvalResult:
    """One evaluated setting: a fixed depth (`exit_criterion` 'none', `loops` iterations) or an adaptive exit
    (`loops` = the cap, `exit_threshold` set); `mean_iterations` = loop iterations per token actually used."""

    loops: int
    loss: float
    perplexity: float
    tokens: int
    batches: int
    mean_iterations: float = 0.0
    bpb: Optional[float] = None
    """Bits per byte of the text targets (None without a tokenizer's byte lengths)."""
    bytes: Optional[int] = None
    exit_criterion: str = "none"
    exit_threshold: Optional[float] = None
    name: str = "valid"
    """The evaluation set."""


def _batches(dataset, micro_batch_size: int, eval_iters: Optional[int]):
    n = len(dataset)
    if eval_iters is not None and eval_iters > 0:
        n = min(n, eval_iters * micro_batch_size)
    from ..model.inputs import collate_tokens

    for start in range(0, n, micro_batch_size):
        yield collate_tokens([dataset[i] for i in range(start, min(n, start + micro_batch_size))])


@torch.no_grad()
def evaluate(model, dataset, micro_batch_size: int = 8, eval_iters: Optional[int] = None,
             num_loops: Optional[int] = None, exit_criterion: Optional[str] = None,
             exit_threshold: Optional[float] = None, byte_lengths=None, name: str = "valid",
             layout=None) -> EvalResult:
    """Token-weighted mean cross-entropy over the first `eval_iters` micro-batches of `dataset` (all of it
    when None). Items are {"tokens": [seq_length + 1]}: inputs tokens[:-1], labels tokens[1:]; items of
    answer-masked data also carry "loss_mask" [seq_length], and then only targets it marks count (loss,
    tokens, bits per byte over the answer tokens' bytes, mean iterations).
    `exit_criterion`/`exit_threshold`: adaptive per-token exit with `num_loops` as the cap (default: fixed
    depth). `byte_lengths` (the tokenizer's token_byte_lengths()) adds bits per byte (data/bpb.py).
    `layout`: the run's DocumentLayout (model/documents.py; `load_for_evaluation` reads it from a checkpoint), so
    positions, attention and counted targets are the trainer's."""
    from ..data.bpb import bits_per_byte, bpb_sums
    from ..model.exit import ExitRule, ExitStats
    from ..model.gpt import IGNORE_INDEX
    from ..model.inputs import prepare_inputs

    device = next(model.parameters()).device
    lengths = None if byte_lengths is None else torch.as_tensor(byte_lengths, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    loops = num_loops or model.loop.num_loops
    criterion = exit_criterion or "none"
    rule = ExitRule(criterion, exit_threshold)
    # nats, text nats, bytes, iterations, counted targets: summed on the device, read once at the end
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    batches = 0
    try:
        for batch in _batches(dataset, micro_batch_size, eval_iters):
            # IGNORE_INDEX labels where a loss mask is 0 (and after an end-of-document input with eod_mask_loss)
            inputs, labels, documents = prepare_inputs(batch, device, layout)
            counted = labels != IGNORE_INDEX
            stats = ExitStats()
            _, token_loss = model(inputs, labels, depth=loops, exit_rule=rule, return_logits=False,
                                  loss_reduction="none", exit_stats=stats, **documents)
            token_loss = token_loss.double()
            sums[0] += token_loss.sum()
            if lengths is not None:
                nats, nbytes = bpb_sums(token_loss, labels, lengths)
                sums[1] += nats
                sums[2] += nbytes
            n = counted.sum()
            sums[3] += (stats.iterations * counted).sum() if stats.iterations is not None else loops * n
            sums[4] += n
            batches += 1
    finally:
        model.train(was_training)
    total, text_nats, nbytes, iterations, tokens = sums.tolist()
    tokens = int(tokens)
    if batches == 0:
        raise ValueError(f"the evaluation set {name!r} is empty.")
    if tokens == 0:
        raise ValueError(f"the evaluation set {name!r} has no target that its loss mask counts (no answer tokens).")
    loss = total / tokens
    bpb = bits_per_byte(text_nats, int(nbytes)) if lengths is not None else None
    return EvalResult(loops=loops, loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=tokens, batches=batches,
                      mean_iterations=iterations / tokens, bpb=bpb, bytes=int(nbytes) if lengths is not None else None,
                      exit_criterion=criterion, exit_threshold=None if criterion == "none" else exit_threshold,
                      name=name)


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


def run_data_settings(cfg, *, data_path: Optional[Sequence[str]] = None, named: Optional[Sequence[str]] = None,
                      split: Optional[str] = None, seed: Optional[int] = None, seq_length: Optional[int] = None,
                      cache_dir: Optional[str] = None, micro_batch_size: Optional[int] = None,
                      eval_split: str = "valid") -> Tuple[Dict[str, Any], List[str]]:
    """The data settings to evaluate a checkpoint with: each one given (not None) wins, the others are the
    run's, read from the checkpoint's recorded config `cfg` (data.data_path or the named
    data.valid_data_path / test_data_path sets, data.split, training.seed, data.seq_length,
    data.data_cache_path, training.micro_batch_size), so the held-out set is the trainer's. Returns
    (settings, lines to print): one line per setting given that differs from the run's, e.g. "split
    949,50,1 (from --split; the run used 969,30,1)"."""
    d, t = cfg.data, cfg.training
    run_named = list(getattr(d, f"{eval_split}_data_path") or [])
    run = {"split": d.split, "seed": t.seed, "seq_length": min(d.seq_length, cfg.model.max_position_embeddings),
           "cache_dir": d.data_cache_path or None, "micro_batch_size": t.micro_batch_size}
    given = {"split": split, "seed": seed, "seq_length": seq_length, "cache_dir": cache_dir or None,
             "micro_batch_size": micro_batch_size}
    flags = {"split": "--split", "seed": "--seed", "seq_length": "--seq-length", "cache_dir": "--data-cache-path",
             "micro_batch_size": "--micro-batch-size"}
    out, notes = {}, []
    for key, value in given.items():
        out[key] = run[key] if value is None else value
        if value is not None and value != run[key]:
            notes.append(f"{key.replace('_', ' ')} {value} (from {flags[key]}; the run used {run[key]})")
    if named:
        out["data_path"], out["named"] = [], list(named)
        if list(named) != run_named:
            notes.append(f"{eval_split} sets {' '.join(named)} (from --{eval_split}-data-path; the run used "
                         f"{' '.join(run_named) if run_named else f'the {eval_split} split of its data path'})")
    elif data_path:
        out["data_path"], out["named"] = list(data_path), None
        if run_named or list(data_path) != list(d.data_path):
            used = (f"the {eval_split} sets {' '.join(run_named)}" if run_named else ' '.join(d.data_path) or "none")
            notes.append(f"data path {' '.join(data_path)} (from --data-path; the run used {used})")
    elif run_named:
        out["data_path"], out["named"] = [], run_named
    elif d.data_path:
        out["data_path"], out["named"] = list(d.data_path), None
    else:
        raise ValueError("the checkpoint records no data path (it was not trained here); pass --data-path or "
                         f"--{eval_split}-data-path NAME=PREFIX ...")
    return out, notes


def describe_data(settings: Dict[str, Any], eval_split: str = "valid") -> str:
    """One line naming what is evaluated, e.g. "valid split of data/x (split 969,30,1, seed 1234, seq_length
    512, micro batch 8)"."""
    if settings["named"]:
        where = f"{eval_split} sets {' '.join(settings['named'])}"
    else:
        where = f"{eval_split} split of {' '.join(settings['data_path'])} (split {settings['split']})"
    return (f"{where}, seed {settings['seed']}, seq_length {settings['seq_length']}, micro batch "
            f"{settings['micro_batch_size']}")


def compute_settings(loops: Optional[Sequence[int]], default_loops: int, exit_criterion: Optional[str],
                     exit_thresholds: Sequence[float], max_loops: Optional[int]) -> Tuple[List[int], bool, int]:
    """(fixed depths, adaptive?, cap of the exit rows) of a test-time compute sweep: `loops` (default
    [`default_loops`]), an exit criterion other than 'none' with at least one threshold, `max_loops`
    (default: the largest depth). ValueError naming the flag for a value out of range."""
    depths = list(loops) if loops else [default_loops]
    for n in depths:
        if n < 1:
            raise ValueError(f"--loops values must be >= 1, got {n}.")
    adaptive = bool(exit_criterion) and exit_criterion != "none"
    if adaptive and not exit_thresholds:
        raise ValueError(f"--exit-criterion {exit_criterion} needs at least one --exit-threshold.")
    cap = max_loops or max(depths)
    if cap < 1:
        raise ValueError(f"--max-loops must be >= 1, got {cap}.")
    return depths, adaptive, cap


@dataclass
class CheckpointEvaluation:
    """A checkpoint made ready to evaluate (`load_for_evaluation`): the model (eval mode, on its device), its
    config, meta (with "eval_data" = the data settings used and "eval_notes" = the ones overridden), the
    tokenizer, its byte lengths, and the held-out sets (name -> dataset of {"tokens": [seq_length + 1]})."""

    model: Any
    cfg: Any
    meta: Dict[str, Any]
    tokenizer: Any
    byte_lengths: Any
    sets: Dict[str, Any]
    micro_batch_size: int
    layout: Any = None
    """The run's DocumentLayout (model/documents.py), None when it saw each window as one text."""


def load_for_evaluation(load: str, data_path: Optional[Sequence[str]] = None, split: Optional[str] = None,
                        eval_split: str = "valid", seq_length: Optional[int] = None,
                        micro_batch_size: Optional[int] = None, tag: Optional[str] = None, seed: Optional[int] = None,
                        cache_dir: Optional[str] = None, device: str = "cpu", named: Optional[Sequence[str]] = None,
                        tokenizer=None) -> CheckpointEvaluation:
    """Load a checkpoint and the held-out sets to evaluate it on (the arguments as for `evaluate_checkpoint`):
    data settings left None are the run's own (`run_data_settings`); the datasets are checked to be made by
    the tokenizer (default: the checkpoint's)."""
    from ..checkpoint import load_checkpoint, tokenizer_for
    from ..data.gpt_dataset import parse_data_path, parse_named_data_paths
    from ..data.indexed_dataset import check_dataset_tokenizer
    from ..model import LoopGPT, load_full_state_dict
    from ..model.documents import DocumentLayout

    cfg, sd, meta = load_checkpoint(load, tag)
    from_run = not data_path and not named
    settings, notes = run_data_settings(cfg, data_path=data_path, named=named, split=split, seed=seed,
                                        seq_length=seq_length, cache_dir=cache_dir,
                                        micro_batch_size=micro_batch_size, eval_split=eval_split)
    data_path, named, split, seed = settings["data_path"], settings["named"], settings["split"], settings["seed"]
    seq_length, cache_dir, micro_batch_size = settings["seq_length"], settings["cache_dir"], settings["micro_batch_size"]
    tokenizer = tokenizer if tokenizer is not None else tokenizer_for(checkpoint=meta["path"], meta=meta)
    prefixes = ([p for _, p in parse_named_data_paths(named, f"--{eval_split}-data-path")] if named
                else [p for _, p in parse_data_path(list(data_path))])
    for prefix in prefixes:
        if from_run and not os.path.isfile(prefix + ".idx"):
            raise ValueError(f"the run's data {prefix} (recorded in {meta['path']}) is not found here ({prefix}.idx "
                             f"is missing); pass --data-path or --{eval_split}-data-path.")
        check_dataset_tokenizer(prefix, tokenizer, cfg.model.vocab_size)
    model = LoopGPT(cfg.model)
    load_full_state_dict(model, sd)
    model = model.to(device).eval()
    if seq_length > cfg.model.max_position_embeddings:
        raise ValueError(f"--seq-length {seq_length} is longer than the model's max_position_embeddings "
                         f"({cfg.model.max_position_embeddings}).")
    meta = dict(meta, eval_data=settings, eval_notes=notes)
    sets = build_eval_sets(data_path, split, seq_length, eval_split, seed, cache_dir, named)
    layout = DocumentLayout.of(cfg.data, tokenizer.eod)
    return CheckpointEvaluation(model, cfg, meta, tokenizer, tokenizer.token_byte_lengths(), sets, micro_batch_size,
                                layout)


def evaluate_checkpoint(load: str, data_path: Optional[Sequence[str]] = None, split: Optional[str] = None,
                        eval_split: str = "valid", seq_length: Optional[int] = None,
                        micro_batch_size: Optional[int] = None, eval_iters: Optional[int] = None,
                        loops: Optional[Sequence[int]] = None, tag: Optional[str] = None, seed: Optional[int] = None,
                        cache_dir: Optional[str] = None, device: str = "cpu", named: Optional[Sequence[str]] = None,
                        exit_criterion: str = "none", exit_thresholds: Sequence[float] = (),
                        max_loops: Optional[int] = None, tokenizer=None) -> Tuple[List[EvalResult], Dict[str, Any]]:
    """Load a checkpoint and evaluate it on every set once per entry of `loops` (default: its
    training.eval_loops, else its trained loop count), then, with an exit criterion, once per threshold
    with `max_loops` (default: the largest of `loops`, or the trained count) as the cap; bits per byte from
    `tokenizer` (default: the checkpoint's). Data settings left None are the run's own
    (`run_data_settings`), so on the run's data the held-out samples are the trainer's: its valid line
    over eval_iters x micro_batch_size x DP samples equals this with eval_iters = its eval_iters x DP.
    The datasets are checked to be made by that tokenizer. Returns (results, checkpoint meta) with
    meta["eval_data"] (the settings used), meta["eval_notes"] (settings overridden, with the run's
    values); meta["config"]["model"]["num_loops"] is the trained count."""
    ev = load_for_evaluation(load, data_path, split, eval_split, seq_length, micro_batch_size, tag, seed, cache_dir,
                             device, named, tokenizer)
    cfg, model, lengths, micro_batch_size = ev.cfg, ev.model, ev.byte_lengths, ev.micro_batch_size
    depths, adaptive, cap = compute_settings(loops, cfg.training.eval_loops or cfg.model.num_loops, exit_criterion,
                                             exit_thresholds, max_loops)
    results = []
    for name, dataset in ev.sets.items():
        for n in depths:
            results.append(evaluate(model, dataset, micro_batch_size, eval_iters, num_loops=n, byte_lengths=lengths,
                                    name=name, layout=ev.layout))
        for threshold in (exit_thresholds if adaptive else ()):
            results.append(evaluate(model, dataset, micro_batch_size, eval_iters, num_loops=cap,
                                    exit_criterion=exit_criterion, exit_threshold=threshold, byte_lengths=lengths,
                                    name=name, layout=ev.layout))
    return results, ev.meta


def markdown_table(results: Sequence[EvalResult], trained_loops: Optional[int] = None) -> str:
    """| set | loops | loss | perplexity | bpb | tokens | (the trained loop count marked with *)."""
    lines = ["| set | loops | loss | perplexity | bpb | tokens |", "|:---|---:|---:|---:|---:|---:|"]
    for r in results:
        mark = "*" if trained_loops is not None and r.loops == trained_loops else ""
        bpb = "-" if r.bpb is None else f"{r.bpb:.4f}"
        lines.append(f"| {r.name} | {r.loops}{mark} | {r.loss:.4f} | {r.perplexity:.2f} | {bpb} | {r.tokens} |")
    return "\n".join(lines)


def exit_table(results: Sequence[EvalResult]) -> str:
    """| set | criterion | threshold | max loops | mean iterations | loss | bpb | tokens | for every row
    (fixed-depth rows read 'fixed' with their loop count)."""
    lines = ["| set | criterion | threshold | max loops | mean iterations / token | loss | bpb | tokens |",
             "|:---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        threshold = "-" if r.exit_threshold is None else f"{r.exit_threshold:g}"
        bpb = "-" if r.bpb is None else f"{r.bpb:.4f}"
        kind = "fixed" if r.exit_criterion == "none" else r.exit_criterion
        lines.append(f"| {r.name} | {kind} | {threshold} | {r.loops} | {r.mean_iterations:.3f} | {r.loss:.4f} | "
                     f"{bpb} | {r.tokens} |")
    return "\n".join(lines)


def write_json(results: Sequence[EvalResult], path: str, **extra) -> None:
    data = dict(extra, results=[asdict(r) for r in results])
    fs.write_json(path, data, indent=2, make_parent=True)
