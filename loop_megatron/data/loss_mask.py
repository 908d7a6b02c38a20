"""Answer-masked datasets: which tokens of a Megatron dataset count in the loss.

A dataset made from prompt/answer records (``tools/preprocess_data.py --prompt-key prompt --answer-key
answer``) is an ordinary Megatron ``PREFIX.bin``/``PREFIX.idx`` pair, byte for byte what Megatron's reader
expects, plus a companion beside it::

    PREFIX.loss_mask.bin / PREFIX.loss_mask.idx

a second MMIDIDX dataset of dtype uint8 with exactly the sequence lengths and document indices of
``PREFIX``: byte j of its sequence i is 1 when token j of sequence i is an answer token (EOD included,
when appended) and 0 for a prompt token. Any Megatron reader opens it as it opens the tokens.

Served samples (data/gpt_dataset.py) then carry ``loss_mask`` [seq_length] (float32) beside
``tokens`` [seq_length + 1]: target t (label ``tokens[t + 1]``) counts iff token t + 1 of the window is an
answer token; windows that span packed documents read each document's own mask. Without the companion a
dataset serves ``tokens`` only and every target counts, as before.
"""

import os
from typing import Optional

import numpy as np

from ..utils.fs import remove_quietly
from .errors import DataError
from .indexed_dataset import IndexedDataset, bin_path, dataset_exists, idx_path

LOSS_MASK_SUFFIX = ".loss_mask"
LOSS_MASK_DTYPE = np.uint8


def loss_mask_prefix(prefix: str) -> str:
    """Prefix of the companion of dataset ``prefix``: ``PREFIX.loss_mask`` (.bin/.idx)."""
    return prefix + LOSS_MASK_SUFFIX


def has_loss_mask(prefix: str) -> bool:
    """True when dataset ``prefix`` has a loss-mask companion (either file counts: a half pair is an error
    that :func:`open_loss_mask` reports)."""
    mask = loss_mask_prefix(prefix)
    return os.path.exists(bin_path(mask)) or os.path.exists(idx_path(mask))


def remove_loss_mask(prefix: str) -> None:
    """Delete the companion of ``prefix`` (a dataset rewritten without masks must not keep a stale one)."""
    mask = loss_mask_prefix(prefix)
    remove_quietly(bin_path(mask), idx_path(mask))


def open_loss_mask(tokens: IndexedDataset) -> Optional[IndexedDataset]:
    """The companion of the opened dataset ``tokens``, or None when it has none.

    Raises:
        DataError: one sentence naming the file, when the companion is half there, not uint8, or does not
            have the tokens' sequence lengths and document indices (it belongs to another dataset).
    """
    prefix = loss_mask_prefix(tokens.prefix)
    if not has_loss_mask(tokens.prefix):
        return None
    if not dataset_exists(prefix):
        missing = bin_path(prefix) if not os.path.exists(bin_path(prefix)) else idx_path(prefix)
        raise DataError(f"{missing} is missing, but its pair exists; re-run tools/preprocess_data.py for "
                        f"{tokens.prefix} (or delete the other {prefix} file to train on every token).")
    mask = IndexedDataset(prefix)
    if mask.dtype != np.dtype(LOSS_MASK_DTYPE):
        raise DataError(f"{idx_path(prefix)}: a loss mask must be uint8, this one holds {mask.dtype}.")
    if (len(mask) != len(tokens) or not np.array_equal(mask.sequence_lengths, tokens.sequence_lengths)
            or not np.array_equal(mask.document_indices, tokens.document_indices)):
        raise DataError(f"{idx_path(prefix)}: its sequences do not match those of {idx_path(tokens.prefix)} "
                        f"({len(mask)} vs {len(tokens)} sequences, {mask.num_tokens} vs {tokens.num_tokens} "
                        "tokens); the mask belongs to another dataset, re-run tools/preprocess_data.py.")
    return mask
