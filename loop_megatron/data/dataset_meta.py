"""Which tokenizer made an indexed dataset: the ``<prefix>.meta.json`` sidecar (its format, writing, reading
and comparing records). The check of a dataset against a model's tokenizer, which also reads the ``.bin``,
is ``indexed_dataset.check_dataset_tokenizer``; this module imports nothing of the data package but its error.

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
