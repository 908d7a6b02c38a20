"""Which tokenizer made an indexed dataset: the ``<prefix>.meta.json`` sidecar and the check against it.

Preprocessing writes, beside ``<prefix>.bin``/``<prefix>.idx`` and atomically with them (renamed into
place before the ``.idx``, which is always last)::

    {"format": "loop_megatron.indexed_dataset_meta", "version": 1,
     "tokenizer": {"type": "HuggingFaceTokenizer", "model": "tokenizer.json", "name": "tok8k/tokenizer.json",
                   "vocab_size": 8192, "eod": 0, "sha256": "..."},
     "dtype": "uint16", "num_documents": 1189, "num_tokens": 1234567, "max_token_id": 8191}

The name ``.meta.json`` (not ``.tokenizer.json``) keeps it apart from Hugging Face's ``tokenizer.json``.
Datasets made before sidecars existed have none; they are taken as GPT-2 datasets (what every earlier
version of the pipeline wrote) and their largest token id is read from the ``.bin``.
"""

import json
import os
from typing import Optional

import numpy as np

from .errors import DataError
from ..utils.fs import remove_quietly, temp_path

META_FORMAT = "loop_megatron.indexed_dataset_meta"
META_VERSION = 1
META_SUFFIX = ".meta.json"
LEGACY_TOKENIZER_TYPE = "GPT2BPETokenizer"


def meta_path(prefix: str) -> str:
    """Path of the sidecar of dataset ``prefix``."""
    return prefix + META_SUFFIX


def make_meta(tokenizer_record: dict, dtype, num_documents: int, num_tokens: int, max_token_id: int) -> dict:
    """The sidecar's contents (``tokenizer_record`` from ``tokenizer.describe()``)."""
    return {
        "format": META_FORMAT,
        "version": META_VERSION,
        "tokenizer": dict(tokenizer_record),
        "dtype": np.dtype(dtype).name,
        "num_documents": int(num_documents),
        "num_tokens": int(num_tokens),
        "max_token_id": int(max_token_id),
    }


def write_meta_tmp(path: str, meta: dict) -> str:
    """Write ``meta`` to a temporary sibling of ``path`` and return it (the caller renames it)."""
    tmp = temp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.write("\n")
    except BaseException:
        remove_quietly(tmp)
        raise
    return tmp


def read_dataset_meta(prefix: str) -> Optional[dict]:
    """The sidecar of ``prefix`` (None when there is none); DataError naming it when it is unreadable."""
    path = meta_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable dataset record ({err}); delete it or re-run preprocessing.") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT or not isinstance(meta.get("tokenizer"), dict):
        raise DataError(f"{path}: not a loop_megatron dataset record (no format {META_FORMAT!r} with a tokenizer).")
    if int(meta.get("version", 0)) > META_VERSION:
        raise DataError(f"{path}: dataset record version {meta.get('version')} is newer than this code reads ({META_VERSION}).")
    return meta


def same_tokenizer(a: dict, b: dict) -> bool:
    """True when two tokenizer records name the same tokenizer (type and content hash)."""
    return a.get("type") == b.get("type") and a.get("sha256") == b.get("sha256")


def describe_record(record: dict) -> str:
    """``HuggingFaceTokenizer tok8k/tokenizer.json (vocab 8192, sha256 1a2b3c4d...)`` for messages."""
    return (f"{record.get('type')} {record.get('name') or record.get('model') or ''} "
            f"(vocab {record.get('vocab_size')}, sha256 {str(record.get('sha256'))[:12]})").replace("  ", " ")


def scan_max_token_id(prefix: str) -> int:
    """Largest token id in ``prefix.bin`` (-1 when empty), read in blocks to bound memory."""
    from .indexed_dataset import IndexedDataset

    tokens = IndexedDataset(prefix).tokens
    best, block = -1, 1 << 24
    for start in range(0, tokens.shape[0], block):
        best = max(best, int(tokens[start:start + block].max()))
    return best


def check_dataset_tokenizer(prefix: str, tokenizer=None, vocab_size: Optional[int] = None) -> str:
    """Refuse a dataset the model cannot read; return a note to log ("" when there is nothing to say).

    Args:
        prefix: dataset prefix (without .bin/.idx).
        tokenizer: the model's tokenizer (from ``build_tokenizer``); None skips the identity check.
        vocab_size: the model's vocabulary size (``model.vocab_size``, before padding); None skips the
            id-range check.

    Raises:
        DataError: one sentence naming the file, when the dataset was made by another tokenizer, its
            tokenizer has a larger vocabulary than the model, or it holds ids >= ``vocab_size``.
    """
    meta = read_dataset_meta(prefix)
    note = ""
    if meta is None:
        note = (f"{prefix}: no tokenizer record ({meta_path(prefix)} is missing, as in datasets made before "
                f"records existed); taken as {LEGACY_TOKENIZER_TYPE}.")
        if tokenizer is not None and tokenizer.tokenizer_type != LEGACY_TOKENIZER_TYPE:
            raise DataError(
                f"{prefix}.bin has no tokenizer record ({meta_path(prefix)} is missing) and is taken as a "
                f"{LEGACY_TOKENIZER_TYPE} dataset, but the model uses {describe_record(tokenizer.describe())}; "
                "re-run tools/preprocess_data.py with the model's --tokenizer-type/--tokenizer-model."
            )
    else:
        record = meta["tokenizer"]
        if tokenizer is not None and not same_tokenizer(record, tokenizer.describe()):
            raise DataError(
                f"{meta_path(prefix)}: the dataset was made by {describe_record(record)} but the model uses "
                f"{describe_record(tokenizer.describe())}; re-run tools/preprocess_data.py with the model's "
                "--tokenizer-type/--tokenizer-model."
            )
        if vocab_size is not None and int(record.get("vocab_size", 0)) > vocab_size:
            raise DataError(
                f"{meta_path(prefix)}: the dataset's tokenizer has {record.get('vocab_size')} tokens, more than "
                f"the model's vocabulary (model.vocab_size = {vocab_size})."
            )
    if vocab_size is not None:
        max_id = int(meta["max_token_id"]) if meta is not None and "max_token_id" in meta else scan_max_token_id(prefix)
        if max_id >= vocab_size:
            raise DataError(
                f"{prefix}.bin holds token id {max_id}, outside the model's vocabulary of {vocab_size} "
                "(model.vocab_size); the dataset was made with a larger vocabulary."
            )
    return note
