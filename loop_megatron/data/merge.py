"""Concatenating Megatron indexed datasets (``tools/merge_datasets.py``): tokens, tokenizer records and loss
masks, in the given order. Its own module because it needs both the format (:mod:`indexed_dataset`) and the
loss-mask companions (:mod:`loss_mask`), which itself builds on the format."""

import os
from typing import Sequence

from .dataset_meta import LEGACY_TOKENIZER_TYPE, describe_record, meta_path, read_dataset_meta, same_tokenizer
from .errors import DataError
from .indexed_dataset import IndexedDataset, IndexedDatasetBuilder, bin_path, idx_path
from .loss_mask import LOSS_MASK_DTYPE, has_loss_mask, loss_mask_prefix, remove_loss_mask


def merge_datasets(input_prefixes: Sequence[str], output_prefix: str) -> int:
    """Concatenate datasets (in the given order) into ``output_prefix``; return its document count.

    The inputs' tokenizer records (``.meta.json``) must name one tokenizer, which the output records
    too. Datasets without a record (made before records existed) count as GPT-2 datasets: they merge
    with each other (the output has no record either) or with recorded GPT-2 datasets. Loss masks
    (answer-masked data, :mod:`loss_mask`) are merged alike when every input has one; a mix of masked
    and unmasked inputs is refused.
    """
    if not input_prefixes:
        raise DataError("merge: no input datasets given.")
    for prefix in input_prefixes:
        for path in (idx_path(prefix), bin_path(prefix)):
            if not os.path.isfile(path):
                raise DataError(f"{path}: no such file; inputs are dataset prefixes without .bin/.idx.")
    metas = [read_dataset_meta(p) for p in input_prefixes]
    recorded = [(p, m) for p, m in zip(input_prefixes, metas) if m is not None]
    record = recorded[0][1]["tokenizer"] if recorded else None
    for prefix, meta in recorded[1:]:
        if not same_tokenizer(meta["tokenizer"], record):
            raise DataError(
                f"{meta_path(prefix)}: made by {describe_record(meta['tokenizer'])}, but "
                f"{meta_path(recorded[0][0])} by {describe_record(record)}; datasets of different tokenizers "
                "cannot be merged."
            )
    if record is not None and len(recorded) < len(metas) and record.get("type") != LEGACY_TOKENIZER_TYPE:
        legacy = next(p for p, m in zip(input_prefixes, metas) if m is None)
        raise DataError(
            f"{meta_path(legacy)} is missing, so {legacy} is taken as a {LEGACY_TOKENIZER_TYPE} dataset, but "
            f"{meta_path(recorded[0][0])} names {describe_record(record)}; datasets of different tokenizers "
            "cannot be merged."
        )
    masked = [has_loss_mask(p) for p in input_prefixes]
    if any(masked) and not all(masked):
        raise DataError(
            f"{input_prefixes[masked.index(True)]} has a loss mask ({loss_mask_prefix(input_prefixes[masked.index(True)])}"
            f".bin/.idx) but {input_prefixes[masked.index(False)]} has none; merge answer-masked datasets only with "
            "each other (or blend them in training, where unmasked data counts every token).")
    first = IndexedDataset(input_prefixes[0])
    out_mask = loss_mask_prefix(output_prefix)
    with IndexedDatasetBuilder(bin_path(output_prefix), first.dtype) as builder:
        if all(masked):  # the mask first, so the tokens' .idx is still the last file to appear
            with IndexedDatasetBuilder(bin_path(out_mask), LOSS_MASK_DTYPE) as mask_builder:
                for prefix in input_prefixes:
                    mask_builder.add_index(loss_mask_prefix(prefix), max_token_id=1)
                mask_builder.finalize(idx_path(out_mask))
        else:
            remove_loss_mask(output_prefix)
        try:
            for prefix, meta in zip(input_prefixes, metas):
                if meta is not None and "max_token_id" in meta:
                    max_id = int(meta["max_token_id"])
                else:
                    max_id = None if record is not None else -1  # scan only when the output gets a record
                builder.add_index(prefix, max_id)
            builder.finalize(idx_path(output_prefix), tokenizer_record=record)
        except BaseException:
            if all(masked):
                remove_loss_mask(output_prefix)
            raise
    return IndexedDataset(output_prefix).num_documents
