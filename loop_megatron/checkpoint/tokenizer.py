"""The tokenizer of a run or a checkpoint: `tokenizer_for`, the one place that answers it.

A checkpoint records its tokenizer in meta.json and, for a HuggingFaceTokenizer, carries a copy of its
tokenizer.json beside model.pt. `save_tokenizer(folder, tok)` copies that file into a checkpoint folder
(atomically) and returns the record for meta.json (``tok.describe()``); GPT-2's bundled tokenizer needs
no file. `tokenizer_for` gives back the tokenizer the trainer, evaluation, generation, conversion and
the tools use. It lives here, not in data/, because a checkpoint's record is one of its answers; it is
used by checkpoint (compatibility refusals, saving), training, inference, hf and tools/.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from ..config import Config, ConfigError
from ..data.errors import DataError
from ..data.tokenizer import HF_TYPE, build_tokenizer
from ..utils import fs
from .layout import CheckpointError, meta_path, read_meta, tokenizer_path


def save_tokenizer(folder: str, tokenizer, fsync: bool = False) -> Dict[str, Any]:
    """Copy the tokenizer's defining file into `folder` (HF tokenizers) and return its record."""
    if tokenizer.tokenizer_type == HF_TYPE:
        with open(tokenizer.model_path, "rb") as f:
            fs.write_bytes(tokenizer_path(folder), f.read(), fsync=fsync)
    return tokenizer.describe()


def tokenizer_for(cfg: Optional[Config] = None, checkpoint: Optional[str] = None,
                  meta: Optional[Dict[str, Any]] = None, *, tokenizer_type: Optional[str] = None,
                  tokenizer_model: Optional[str] = None, fit_model_vocab: bool = False):
    """The tokenizer to use; the first of these that is given wins:

    1. ``tokenizer_type`` / ``tokenizer_model``: named on a tool's command line (--tokenizer-type /
       --tokenizer-model; a model alone means HuggingFaceTokenizer). DataError when it cannot be loaded.
    2. ``checkpoint``: a checkpoint folder (a tag folder holding meta.json; ``meta``, its meta.json when
       already read): the tokenizer it records, GPT-2 for checkpoints without a record (they predate
       records). CheckpointError when the record names a file the folder lacks or that was altered.
    3. ``cfg``: the run's data.tokenizer_type / data.tokenizer_model (GPT2BPETokenizer: data.vocab_file /
       data.merge_file when set). ConfigError naming the field when it cannot be loaded.

    With ``fit_model_vocab``, ConfigError when the tokenizer has more tokens than cfg.model.vocab_size.
    build_tokenizer caches per process, so repeated calls (preflight's checks) share one instance.
    """
    if tokenizer_type or tokenizer_model:
        tok = build_tokenizer(tokenizer_type or (HF_TYPE if tokenizer_model else None), tokenizer_model or None)
    elif checkpoint is not None:
        tok = load_tokenizer(checkpoint, meta)
    elif cfg is not None:
        d = cfg.data
        try:
            tok = build_tokenizer(d.tokenizer_type, d.tokenizer_model or None, d.vocab_file or None,
                                  d.merge_file or None)
        except DataError as exc:  # the sentence gets the field it came from
            fields = "data.tokenizer_model" if d.tokenizer_model else "data.vocab_file / data.merge_file" \
                if d.vocab_file or d.merge_file else "data.tokenizer_type"
            raise ConfigError(f"{fields}: {exc}") from None
    else:
        raise TypeError("tokenizer_for needs a config, a checkpoint folder or a tokenizer type/model")
    if fit_model_vocab and tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the vocabulary of the "
                          f"tokenizer {tok.name} ({tok.vocab_size}); set model.vocab_size={tok.vocab_size}.")
    return tok


def load_tokenizer(folder: str, meta: Optional[Dict[str, Any]] = None):
    """The tokenizer checkpoint `folder` records (case 2 of `tokenizer_for`, which callers should use)."""
    meta = meta if meta is not None else read_meta(folder)
    record = meta.get("tokenizer")
    if not record or record.get("type") != HF_TYPE:
        return build_tokenizer()
    path = tokenizer_path(folder)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: {meta_path(folder)} names a {HF_TYPE} but the checkpoint has no "
                              f"{os.path.basename(path)}; pass --tokenizer-type/--tokenizer-model.")
    tok = build_tokenizer(HF_TYPE, path)
    if tok.sha256 != record.get("sha256"):
        raise CheckpointError(f"{path}: differs from the tokenizer recorded in {meta_path(folder)} "
                              f"(sha256 {tok.sha256[:12]} vs {str(record.get('sha256'))[:12]}).")
    return tok
