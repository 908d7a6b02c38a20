"""Training/validation batches from the data package, split over data-parallel ranks.

Sample order is a pure function of `consumed_samples`: the global batch of step i holds samples
[i x G, (i + 1) x G) of the (already shuffled) dataset, G the global batch size. Micro-batch m of DP rank
r takes samples consumed + m x (micro x DP) + r x micro + [0, micro), Megatron's layout, so every DP
rank sees different samples, the TP ranks of one group (same DP rank) see the same ones, and one step
covers the same G samples whatever the DP size / accumulation split. Resuming at step i re-creates the
order from i x G exactly.
"""
from __future__ import annotations

import collections
import os
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..config import Config, ConfigError, eval_samples, global_batch_size
from ..data.errors import DataError
from ..data.gpt_dataset import (build_named_eval_datasets, build_train_valid_test_datasets, parse_data_path,
                                parse_named_data_paths, parse_split)
from ..data.indexed_dataset import check_dataset_tokenizer
from ..model.inputs import collate_tokens


def check_data_paths(data_path: Sequence[str]) -> None:
    """ConfigError naming the first missing .bin/.idx (before any heavy work)."""
    if not data_path:
        raise ConfigError("data.data_path is empty; pass --data-path PREFIX (a Megatron .bin/.idx pair without "
                          "the extension).")
    try:
        pairs = parse_data_path(data_path)
    except DataError as exc:
        raise ConfigError(f"data.data_path: {exc}") from None
    for _, prefix in pairs:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise ConfigError(f"data.data_path: {prefix + ext} does not exist (expected the pair "
                                  f"{prefix}.bin and {prefix}.idx).")


EVAL_SETS = ("valid", "test")


def _named_eval_paths(cfg: Config, which: str):
    """[(name, prefix)] of data.valid_data_path / data.test_data_path; DataError naming the field."""
    if which not in EVAL_SETS:
        raise ValueError(f"which must be one of {EVAL_SETS}, got {which!r}")
    return parse_named_data_paths(getattr(cfg.data, f"{which}_data_path"), f"data.{which}_data_path")


def check_eval_data_paths(cfg: Config) -> None:
    """ConfigError naming the field and the first missing .bin/.idx of the named valid/test sets (DataError
    naming the field for an entry that cannot be parsed)."""
    for which in EVAL_SETS:
        for name, prefix in _named_eval_paths(cfg, which):
            for ext in (".bin", ".idx"):
                if not os.path.isfile(prefix + ext):
                    raise ConfigError(f"data.{which}_data_path: {prefix + ext} (set {name!r}) does not exist "
                                      f"(expected the pair {prefix}.bin and {prefix}.idx).")


def build_eval_datasets(cfg: Config, dp_size: int, which: str = "valid") -> "collections.OrderedDict":
    """Ordered ``name -> dataset`` to evaluate on: the named sets of data.valid_data_path (or
    data.test_data_path), each used whole; without any, the valid (test) split of data.data_path under
    the name 'valid' ('test'), as before named sets existed. Each set serves
    eval_iters x global_batch_size samples (config.eval_samples; a small set is repeated to fill them).
    Empty when training.eval_iters is 0 or data.split gives that split no share.
    """
    t, d = cfg.training, cfg.data
    samples = eval_samples(cfg, dp_size)
    named = _named_eval_paths(cfg, which)
    out = collections.OrderedDict()
    if samples <= 0:
        return out
    try:
        if named:
            return build_named_eval_datasets(named, d.seq_length, t.seed, samples, d.data_cache_path or None, which)
        index = EVAL_SETS.index(which) + 1
        if parse_split(d.split)[index] <= 0:
            return out
        wanted = [0, 0, 0]
        wanted[index] = samples
        ds = build_train_valid_test_datasets(d.data_path, d.split, d.seq_length, t.seed, tuple(wanted),
                                             d.data_cache_path or None)[index]
    except DataError as exc:
        raise ConfigError(f"data.{which}_data_path: {exc}" if named else str(exc)) from None
    if ds is not None:
        out[which] = ds
    return out


def check_data_tokenizers(cfg: Config, tokenizer) -> List[str]:
    """Check every dataset of data_path, valid_data_path and test_data_path against the run's tokenizer
    and model.vocab_size; return notes to log (older datasets without a tokenizer record). Raises
    DataError (one sentence naming the file) for a dataset made by another tokenizer or holding ids
    beyond model.vocab_size."""
    prefixes = [p for _, p in parse_data_path(cfg.data.data_path)] if cfg.data.data_path else []
    for which in EVAL_SETS:
        prefixes += [p for _, p in _named_eval_paths(cfg, which)]
    notes = []
    for prefix in dict.fromkeys(prefixes):
        note = check_dataset_tokenizer(prefix, tokenizer, cfg.model.vocab_size)
        if note:
            notes.append(note)
    return notes


def byte_length_table(tokenizer, vocab_size: int, device) -> torch.Tensor:
    """The tokenizer's UTF-8 bytes per token id as an int64 tensor on `device`, padded with zeros (or
    cut) to `vocab_size` rows, for `bpb_sums` on the accelerator."""
    lengths = np.zeros(vocab_size, np.int64)
    table = np.asarray(tokenizer.token_byte_lengths(), np.int64)[:vocab_size]
    lengths[:table.shape[0]] = table
    return torch.from_numpy(lengths).to(device)


def build_datasets(cfg: Config, dp_size: int):
    """(train, valid) datasets sized for this run; valid is None without a valid split or eval_iters 0."""
    t, d = cfg.training, cfg.data
    gbs = global_batch_size(cfg, dp_size)
    train_samples = t.train_iters * gbs
    valid_samples = eval_samples(cfg, dp_size) if parse_split(d.split)[1] > 0 else 0
    train, valid, _ = build_train_valid_test_datasets(
        d.data_path, d.split, d.seq_length, t.seed, (train_samples or 0, valid_samples, 0),
        d.data_cache_path or None)
    return train, valid


def micro_batch_indices(consumed: int, micro: int, dp_size: int, dp_rank: int, m: int) -> List[int]:
    start = consumed + m * micro * dp_size + dp_rank * micro
    return list(range(start, start + micro))


class TrainBatchSampler:
    """Index lists of this rank's micro-batches, step by step, from `start_iteration` on."""

    def __init__(self, start_iteration: int, train_iters: int, global_batch: int, micro: int, dp_size: int,
                 dp_rank: int, first_sample: Optional[int] = None):
        self.start, self.end = start_iteration, train_iters
        self.global_batch, self.micro, self.dp_size, self.dp_rank = global_batch, micro, dp_size, dp_rank
        self.accum = global_batch // (micro * dp_size)
        # Sample index of the first step; start x global batch unless a resume changed the batch size.
        self.first_sample = start_iteration * global_batch if first_sample is None else first_sample

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.accum

    def __iter__(self) -> Iterator[List[int]]:
        for it in range(self.start, self.end):
            consumed = self.first_sample + (it - self.start) * self.global_batch
            for m in range(self.accum):
                yield micro_batch_indices(consumed, self.micro, self.dp_size, self.dp_rank, m)


class EvalBatchSampler:
    """This rank's first `micro_batches` micro-batches of an evaluation set (config.eval_micro_batches:
    eval_iters global batches; the same samples at every evaluation, each sample read by one DP rank)."""

    def __init__(self, micro_batches: int, micro: int, dp_size: int, dp_rank: int):
        self.micro_batches, self.micro, self.dp_size, self.dp_rank = micro_batches, micro, dp_size, dp_rank

    def __len__(self) -> int:
        return self.micro_batches

    def __iter__(self) -> Iterator[List[int]]:
        for m in range(self.micro_batches):
            yield micro_batch_indices(0, self.micro, self.dp_size, self.dp_rank, m)


def loader(dataset, batch_sampler, num_workers: int, generator: Optional[torch.Generator] = None) -> DataLoader:
    """A DataLoader over `batch_sampler`. Pass a private `generator`: creating an iterator draws a seed
    from it, and drawing from the global RNG would shift dropout masks between fresh and resumed runs."""
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_tokens,
                      generator=generator)
