"""Training/validation batches from the data package, split over data-parallel ranks.

Sample order is a pure function of `consumed_samples`: the global batch of step i holds samples
[i x G, (i + 1) x G) of the (already shuffled) dataset, G the global batch size. Micro-batch m of DP rank
r takes samples consumed + m x (micro x DP) + r x micro + [0, micro), Megatron's layout, so every DP
rank sees different samples, the TP ranks of one group (same DP rank) see the same ones, and one step
covers the same G samples whatever the DP size / accumulation split. Resuming at step i re-creates the
order from i x G exactly.
"""
from __future__ import annotations

import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..config import Config, ConfigError


def check_data_paths(data_path: Sequence[str]) -> None:
    """ConfigError naming the first missing .bin/.idx (before any heavy work)."""
    from ..data.gpt_dataset import parse_data_path
    from ..data.errors import DataError

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


def build_datasets(cfg: Config, dp_size: int):
    """(train, valid) datasets sized for this run; valid is None without a valid split or eval_iters 0."""
    from ..data.gpt_dataset import build_train_valid_test_datasets, parse_split

    t, d = cfg.training, cfg.data
    gbs = t.global_batch_size or t.micro_batch_size * dp_size
    train_samples = t.train_iters * gbs
    eval_samples = t.eval_iters * t.micro_batch_size * dp_size
    if parse_split(d.split)[1] <= 0:
        eval_samples = 0
    train, valid, _ = build_train_valid_test_datasets(
        d.data_path, d.split, d.seq_length, t.seed, (train_samples or 0, eval_samples, 0),
        d.data_cache_path or None)
    return train, valid


def collate_tokens(items) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(item["tokens"], dtype=np.int64) for item in items]))


def micro_batch_indices(consumed: int, micro: int, dp_size: int, dp_rank: int, m: int) -> List[int]:
    start = consumed + m * micro * dp_size + dp_rank * micro
    return list(range(start, start + micro))


class TrainBatchSampler:
    """Index lists of this rank's micro-batches, step by step, from `start_iteration` on."""

    def __init__(self, start_iteration: int, train_iters: int, global_batch: int, micro: int, dp_size: int,
                 dp_rank: int):
        self.start, self.end = start_iteration, train_iters
        self.global_batch, self.micro, self.dp_size, self.dp_rank = global_batch, micro, dp_size, dp_rank
        self.accum = global_batch // (micro * dp_size)

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.accum

    def __iter__(self) -> Iterator[List[int]]:
        for it in range(self.start, self.end):
            consumed = it * self.global_batch
            for m in range(self.accum):
                yield micro_batch_indices(consumed, self.micro, self.dp_size, self.dp_rank, m)


class EvalBatchSampler:
    """The first eval_iters micro-batches of this rank (the same valid samples at every evaluation)."""

    def __init__(self, eval_iters: int, micro: int, dp_size: int, dp_rank: int):
        self.eval_iters, self.micro, self.dp_size, self.dp_rank = eval_iters, micro, dp_size, dp_rank

    def __len__(self) -> int:
        return self.eval_iters

    def __iter__(self) -> Iterator[List[int]]:
        for m in range(self.eval_iters):
            yield micro_batch_indices(0, self.micro, self.dp_size, self.dp_rank, m)


def loader(dataset, batch_sampler, num_workers: int, generator: Optional[torch.Generator] = None) -> DataLoader:
    """A DataLoader over `batch_sampler`. Pass a private `generator`: creating an iterator draws a seed
    from it, and drawing from the global RNG would shift dropout masks between fresh and resumed runs."""
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_tokens,
                      generator=generator)


def split_inputs(tokens: torch.Tensor, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """[B, T+1] window -> (input_ids [B, T], labels [B, T])."""
    tokens = tokens.to(device, non_blocking=True)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
