"""Megatron ``MMIDIDX`` (version 1) indexed dataset: a ``.bin`` of raw token ids plus an ``.idx`` index.

Layout of ``prefix.idx`` (little endian), identical to megatron-core's ``indexed_dataset.py``::

    9 bytes  magic  b"MMIDIDX\\x00\\x00"
    u64      version (1)
    u8       dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    u64      sequence count S
    u64      document-index count D + 1 (D documents; the array starts with 0)
    int32[S]     sequence lengths (tokens)
    int64[S]     byte offset of each sequence in the .bin
    int64[D + 1] document indices: document d is sequences document_indices[d]:document_indices[d+1]

``prefix.bin`` is the sequences' token ids back to back in that dtype. Our preprocessing writes one
sequence per document, as Megatron's does without ``--split-sentences``. The builder writes the
``.meta.json`` sidecar of :mod:`dataset_meta` with the files; ``check_dataset_tokenizer`` refuses a dataset
that does not fit a model's tokenizer and vocabulary. Concatenating datasets is :mod:`merge` (it also
merges loss masks, which are themselves indexed datasets: :mod:`loss_mask`).
"""

import mmap
import os
import shutil
import struct
from typing import List, Optional, Sequence, Union

import numpy as np

from ..utils.fs import remove_quietly, temp_path
from .dataset_meta import (LEGACY_TOKENIZER_TYPE, describe_record, make_meta, meta_path, read_dataset_meta,
                           same_tokenizer, write_meta_tmp)
from .errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count

DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: Optional[int]) -> type:
    """uint16 when every id fits (vocab below 65500, Megatron's threshold), else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def bin_path(prefix: str) -> str:
    """Path of the token file of dataset ``prefix``."""
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    """Path of the index file of dataset ``prefix``."""
    return prefix + ".idx"


def dataset_exists(prefix: str) -> bool:
    """True when both ``prefix.bin`` and ``prefix.idx`` exist."""
    return os.path.isfile(bin_path(prefix)) and os.path.isfile(idx_path(prefix))


class _Index:
    """Parsed and validated ``.idx`` file (arrays are views into an mmap)."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                header = f.read(_HEADER.size)
        except OSError as err:
            raise DataError(f"{path}: cannot read the index file ({err.strerror}).") from None
        if len(header) < _HEADER.size or not header.startswith(MAGIC):
            raise DataError(f"{path}: not a Megatron MMIDIDX index file (bad magic bytes).")
        _, version, code, seq_count, doc_count = _HEADER.unpack(header)
        if version != VERSION:
            raise DataError(f"{path}: unsupported MMIDIDX version {version} (only version 1 is read).")
        if code not in DTYPE_CODES:
            raise DataError(f"{path}: unknown token dtype code {code} in the index header.")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + seq_count * (4 + 8) + doc_count * 8
        # Multimodal indices append one int8 mode per sequence; we read the rest and ignore modes.
        if size not in (expected, expected + seq_count) or doc_count < 1:
            raise DataError(
                f"{path}: index is {size} bytes but its header describes {seq_count} sequences and "
                f"{doc_count - 1} documents ({expected} bytes); the file is truncated or corrupt."
            )
        self.sequence_count = seq_count
        with open(path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self._mmap
        off = _HEADER.size
        self.sequence_lengths = np.frombuffer(buf, np.int32, seq_count, off)
        off += seq_count * 4
        self.sequence_pointers = np.frombuffer(buf, np.int64, seq_count, off)
        off += seq_count * 8
        self.document_indices = np.frombuffer(buf, np.int64, doc_count, off)
        if self.document_indices[0] != 0 or self.document_indices[-1] != seq_count:
            raise DataError(
                f"{path}: document indices must run from 0 to the sequence count {seq_count}; "
                "the index is corrupt."
            )

    def data_bytes(self) -> int:
        """Size the .bin must have according to this index."""
        if self.sequence_count == 0:
            return 0
        return int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize


class IndexedDataset:
    """Memory-mapped reader of a Megatron ``prefix.bin``/``prefix.idx`` pair.

    ``ds[i]`` is sequence ``i`` as a read-only numpy array of token ids (a view into the mmap);
    ``ds.get(i, offset, length)`` a slice of it. Opening checks magic, version, dtype and that the .bin
    has exactly the size the index implies, raising :class:`DataError` otherwise.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._open()

    def _open(self) -> None:
        self.index = _Index(idx_path(self.prefix))
        path = bin_path(self.prefix)
        try:
            size = os.path.getsize(path)
        except OSError as err:
            raise DataError(f"{path}: cannot read the token file ({err.strerror}).") from None
        expected = self.index.data_bytes()
        if size != expected:
            raise DataError(
                f"{path}: token file is {size} bytes but its index {idx_path(self.prefix)} describes "
                f"{expected} bytes; the file is truncated or belongs to another index."
            )
        self.dtype = self.index.dtype
        if size == 0:
            self._bin_mmap = None
            self.tokens = np.zeros(0, self.dtype)
        else:
            with open(path, "rb") as f:
                self._bin_mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.tokens = np.frombuffer(self._bin_mmap, self.dtype)
        # Element (not byte) offset of each sequence into ``tokens``.
        self.sequence_starts = self.index.sequence_pointers // self.dtype.itemsize

    # Reopen from the prefix after pickling (DataLoader workers), since mmaps do not pickle.
    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.prefix = state["prefix"]
        self._open()

    def __len__(self) -> int:
        return self.index.sequence_count

    def __getitem__(self, idx: Union[int, slice]) -> Union[np.ndarray, List[np.ndarray]]:
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        start = int(self.sequence_starts[idx])
        return self.tokens[start : start + int(self.index.sequence_lengths[idx])]

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``offset:offset+length`` of sequence ``idx`` (to its end when length is None)."""
        seq_len = int(self.index.sequence_lengths[idx])
        if length is None:
            length = seq_len - offset
        start = int(self.sequence_starts[idx]) + offset
        return self.tokens[start : start + length]

    @property
    def sequence_lengths(self) -> np.ndarray:
        """int32 [S]: tokens in each sequence."""
        return self.index.sequence_lengths

    @property
    def document_indices(self) -> np.ndarray:
        """int64 [D + 1]: document d spans sequences ``document_indices[d]:document_indices[d+1]``."""
        return self.index.document_indices

    @property
    def num_documents(self) -> int:
        """Number of documents D."""
        return len(self.index.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        """Total token count over all sequences."""
        return int(self.tokens.shape[0])


class IndexedDatasetBuilder:
    """Writes a Megatron ``.bin``/``.idx`` pair; files appear under their final names only in finalize.

    Usage::

        builder = IndexedDatasetBuilder("out_text_document.bin", dtype=np.uint16)
        builder.add_document([15496, 995, 50256])
        builder.finalize("out_text_document.idx")

    On an exception inside ``with IndexedDatasetBuilder(...) as b:`` (or after :meth:`abort`) the
    temporary files are deleted and nothing is left behind.
    """

    def __init__(self, bin_path: str, dtype: type = np.uint16):
        self.bin_path = bin_path
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise DataError(f"{bin_path}: dtype {self.dtype} cannot be stored in an MMIDIDX file.")
        parent = os.path.dirname(os.path.abspath(bin_path))
        os.makedirs(parent, exist_ok=True)
        self._tmp_bin = temp_path(bin_path)
        self._file = open(self._tmp_bin, "wb")
        self._lengths: List[np.ndarray] = []  # chunks of int32 sequence lengths
        self._doc_ends: List[np.ndarray] = []  # chunks of document end indices (sequence counts)
        self._num_sequences = 0
        self._num_tokens = 0
        self.max_token_id = -1  # recorded in the .meta.json sidecar, so checks need not scan the .bin
        self._closed = False

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add_document(self, ids: Sequence[int], lengths: Optional[Sequence[int]] = None) -> None:
        """Append one document; ``lengths`` splits it into several sequences (default: one)."""
        arr = np.asarray(ids, dtype=self.dtype)
        lens = np.asarray([arr.size] if lengths is None else lengths, dtype=np.int32)
        self._note_tokens(arr)
        self._file.write(arr.tobytes())
        self._lengths.append(lens)
        self._num_sequences += len(lens)
        self._doc_ends.append(np.array([self._num_sequences], dtype=np.int64))

    def add_documents(self, ids: np.ndarray, doc_lengths: Sequence[int]) -> None:
        """Append many one-sequence documents at once: ``ids`` is their concatenation."""
        lens = np.asarray(doc_lengths, dtype=np.int32)
        arr = np.asarray(ids, dtype=self.dtype)
        if int(lens.sum()) != arr.size:
            raise ValueError("add_documents: doc_lengths do not sum to the number of ids")
        self._note_tokens(arr)
        self._file.write(arr.tobytes())
        self._lengths.append(lens)
        self._doc_ends.append(self._num_sequences + np.arange(1, len(lens) + 1, dtype=np.int64))
        self._num_sequences += len(lens)

    def _note_tokens(self, arr: np.ndarray) -> None:
        self._num_tokens += int(arr.size)
        if arr.size:
            self.max_token_id = max(self.max_token_id, int(arr.max()))

    def add_index(self, prefix: str, max_token_id: Optional[int] = None) -> None:
        """Append every document of the existing dataset ``prefix`` (which must have the same dtype).

        ``max_token_id`` (from the dataset's sidecar) saves scanning its .bin for the largest id.
        """
        other = _Index(idx_path(prefix))
        if other.dtype != self.dtype:
            raise DataError(
                f"{idx_path(prefix)}: tokens are {other.dtype} but the dataset being built uses "
                f"{self.dtype}; datasets can only be merged when their dtypes match."
            )
        expected = other.data_bytes()
        size = os.path.getsize(bin_path(prefix))
        if size != expected:
            raise DataError(
                f"{bin_path(prefix)}: token file is {size} bytes but its index describes {expected} "
                "bytes; the file is truncated or belongs to another index."
            )
        self._lengths.append(np.array(other.sequence_lengths, dtype=np.int32))
        self._doc_ends.append(self._num_sequences + np.array(other.document_indices[1:], np.int64))
        self._num_sequences += other.sequence_count
        self._num_tokens += expected // self.dtype.itemsize
        if max_token_id is None:
            max_token_id = scan_max_token_id(prefix)
        self.max_token_id = max(self.max_token_id, int(max_token_id))
        with open(bin_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._file, 16 << 20)

    def finalize(self, idx_path: str, tokenizer_record: Optional[dict] = None) -> None:
        """Write the index and move the files to their final names (the .idx last).

        With ``tokenizer_record`` (``tokenizer.describe()``) the ``.meta.json`` sidecar naming the
        tokenizer is written too, renamed into place before the .idx; without it a stale sidecar of an
        earlier dataset under the same name is removed.
        """
        self._file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        doc_ends = np.concatenate(self._doc_ends) if self._doc_ends else np.zeros(0, np.int64)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_indices = np.concatenate([np.zeros(1, np.int64), doc_ends])
        tmp_idx = temp_path(idx_path)
        sidecar = meta_path(idx_path[:-4] if idx_path.endswith(".idx") else idx_path)
        tmp_meta = None
        try:
            with open(tmp_idx, "wb") as f:
                f.write(_HEADER.pack(MAGIC, VERSION, _CODE_OF[self.dtype], len(lengths), len(doc_indices)))
                f.write(lengths.tobytes())
                f.write(pointers.tobytes())
                f.write(doc_indices.tobytes())
            if tokenizer_record is not None:
                meta = make_meta(tokenizer_record, self.dtype, len(doc_indices) - 1, self._num_tokens, self.max_token_id)
                tmp_meta = write_meta_tmp(sidecar, meta)
            # The .idx is renamed last: a reader needs both files, so a crash in between leaves a
            # dataset that does not open rather than one that opens with stale contents.
            os.replace(self._tmp_bin, self.bin_path)
            if tmp_meta is not None:
                os.replace(tmp_meta, sidecar)
            else:
                remove_quietly(sidecar)
            os.replace(tmp_idx, idx_path)
        except BaseException:
            remove_quietly(tmp_idx, self._tmp_bin, *([tmp_meta] if tmp_meta else []))
            raise
        self._closed = True

    def abort(self) -> None:
        """Discard everything written so far."""
        if not self._closed:
            self._file.close()
            remove_quietly(self._tmp_bin)
            self._closed = True


def scan_max_token_id(prefix: str) -> int:
    """Largest token id in ``prefix.bin`` (-1 when empty), read in blocks to bound memory."""
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
