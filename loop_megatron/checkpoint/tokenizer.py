"""The tokenizer a checkpoint was trained with: recorded in meta.json, its file copied beside model.pt.

`save_tokenizer(folder, tok)` copies a HuggingFaceTokenizer's tokenizer.json into the checkpoint folder
(atomically) and returns the record for meta.json (``tok.describe()``); GPT-2's bundled tokenizer needs
no file. `load_tokenizer(folder, meta)` gives back the tokenizer evaluation, generation and conversion
should use: the copied file when the record names a HuggingFaceTokenizer, GPT-2 otherwise (also for
checkpoints that predate the record).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from ..utils import fs
from .layout import CheckpointError, meta_path, read_meta, tokenizer_path

HF_TYPE = "HuggingFaceTokenizer"


def save_tokenizer(folder: str, tokenizer, fsync: bool = False) -> Dict[str, Any]:
    """Copy the tokenizer's defining file into `folder` (HF tokenizers) and return its record."""
    if tokenizer.tokenizer_type == HF_TYPE:
        with open(tokenizer.model_path, "rb") as f:
            fs.write_bytes(tokenizer_path(folder), f.read(), fsync=fsync)
    return tokenizer.describe()


def load_tokenizer(folder: str, meta: Optional[Dict[str, Any]] = None):
    """The checkpoint's tokenizer (CheckpointError, one sentence, when its file is missing or altered)."""
    from ..data.errors import DataError
    from ..data.tokenizer import build_tokenizer

    meta = meta if meta is not None else read_meta(folder)
    record = meta.get("tokenizer")
    if not record or record.get("type") != HF_TYPE:
        return build_tokenizer()
    path = tokenizer_path(folder)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: {meta_path(folder)} names a {HF_TYPE} but the checkpoint has no "
                              f"{os.path.basename(path)}; pass --tokenizer-type/--tokenizer-model.")
    try:
        tok = build_tokenizer(HF_TYPE, path)
    except DataError as exc:
        raise CheckpointError(str(exc)) from None
    if tok.sha256 != record.get("sha256"):
        raise CheckpointError(f"{path}: differs from the tokenizer recorded in {meta_path(folder)} "
                              f"(sha256 {tok.sha256[:12]} vs {str(record.get('sha256'))[:12]}).")
    return tok


def tokenizer_for(folder: str, meta: Optional[Dict[str, Any]] = None, tokenizer_type: Optional[str] = None,
                  tokenizer_model: Optional[str] = None):
    """The tokenizer a tool should use: the one named on its command line when given, else the
    checkpoint's."""
    from ..data.errors import DataError
    from ..data.tokenizer import build_tokenizer

    if tokenizer_type or tokenizer_model:
        try:
            return build_tokenizer(tokenizer_type or (HF_TYPE if tokenizer_model else None), tokenizer_model or None)
        except DataError as exc:
            raise CheckpointError(str(exc)) from None
    return load_tokenizer(folder, meta)
