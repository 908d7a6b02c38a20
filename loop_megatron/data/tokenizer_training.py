"""Train a byte-level BPE tokenizer with Hugging Face ``tokenizers`` (the core of ``tools/train_tokenizer.py``).

The tokenizer is GPT-2's design at a size of your choosing: GPT-2's pre-tokenizing regex, the 256
byte symbols as the initial alphabet (any text round-trips, no unknown tokens), merges learnt from the
input, and ``<|endoftext|>`` as its one special token (id 0), the end-of-document token that
preprocessing appends. Inputs are read by the same readers as preprocessing (JSONL, folders of .txt,
globs, saved Hugging Face datasets) and may be several.

Training is deterministic: ``tokenizers`` counts words and pairs order-independently and breaks ties
between equally frequent pairs by the pair itself, so the same input gives a byte-identical
``tokenizer.json`` (tested).
"""

import dataclasses
import json
import os
import time
from typing import Iterator, Optional, Sequence

from .errors import DataError
from ..utils.fs import write_text
from .preprocess import _texts_of, input_size, iter_records
from .tokenizer import EOD_TOKEN, HF_TOKENIZER_FILE

MIN_VOCAB_SIZE = 257  # 256 byte symbols + <|endoftext|>


@dataclasses.dataclass
class TokenizerTrainingStats:
    """What a tokenizer training run did."""

    documents: int = 0
    """Documents read (per json key)."""
    input_bytes: int = 0
    """Bytes of input read."""
    vocab_size: int = 0
    """Vocabulary size reached (can be below the request when the input has too few distinct pairs)."""
    seconds: float = 0.0
    """Wall time."""
    skipped: int = 0
    """Bad records skipped (only with skip_bad_records)."""
    path: str = ""
    """The tokenizer.json written."""

    def summary(self) -> str:
        """Human-readable one-line report."""
        text = (f"Trained a {self.vocab_size:,}-token byte-level BPE on {self.documents:,} documents "
                f"({self.input_bytes / 1e6:.1f} MB) in {self.seconds:.1f} s: {self.path}")
        if self.skipped:
            text += f" ({self.skipped:,} bad records skipped)"
        return text + "."


def iter_texts(
    inputs: Sequence[str],
    json_keys: Sequence[str] = ("text",),
    hf_split: str = "train",
    skip_bad_records: bool = False,
    stats: Optional[TokenizerTrainingStats] = None,
    on_bytes=None,
) -> Iterator[str]:
    """Every document text of every input, in order (preprocessing's readers and checks)."""
    keys = list(json_keys)
    for input_path in inputs:
        for record, nbytes in iter_records(input_path, keys, hf_split):
            if stats is not None:
                stats.input_bytes += nbytes
            if on_bytes is not None:
                on_bytes(nbytes)
            if record is None:
                continue
            try:
                texts = _texts_of(record, keys)
            except ValueError as err:
                if not skip_bad_records:
                    raise DataError(f"{record[0]}: {err}.") from None
                if stats is not None:
                    stats.skipped += 1
                continue
            if stats is not None:
                stats.documents += 1
            yield from texts


def new_byte_level_bpe():
    """An untrained GPT-2-style byte-level BPE pipeline (pre-tokenizer, decoder, post-processor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_bpe_tokenizer(
    inputs: Sequence[str],
    vocab_size: int,
    output_dir: str,
    json_keys: Sequence[str] = ("text",),
    hf_split: str = "train",
    min_frequency: int = 2,
    skip_bad_records: bool = False,
    progress: bool = True,
) -> TokenizerTrainingStats:
    """Train on ``inputs`` and write ``output_dir/tokenizer.json`` (+ ``tokenizer_config.json``) atomically.

    Args:
        inputs: input paths as preprocessing takes them (files, folders, globs, saved HF datasets).
        vocab_size: target vocabulary size including the 256 byte symbols and ``<|endoftext|>``.
        output_dir: folder to write into (created).
        json_keys: JSON fields holding the text (every key's text is training text).
        hf_split: split of a saved Hugging Face DatasetDict.
        min_frequency: pairs seen fewer times are never merged.
        skip_bad_records: skip malformed records instead of stopping.
        progress: show a progress bar of input bytes and the trainer's merge progress.
    """
    from tokenizers import pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"--vocab-size {vocab_size}: must be at least {MIN_VOCAB_SIZE} (256 bytes + <|endoftext|>).")
    if not inputs:
        raise DataError("--input: name at least one input file, folder or glob.")
    start = time.perf_counter()
    stats = TokenizerTrainingStats()
    sizes = [input_size(p) for p in inputs]  # also fails early on a missing input
    total = None if any(s is None for s in sizes) else sum(sizes)
    bar = None
    on_bytes = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="read", smoothing=0.1)
        on_bytes = bar.update
    tok = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    try:
        tok.train_from_iterator(iter_texts(inputs, json_keys, hf_split, skip_bad_records, stats, on_bytes), trainer)
    finally:
        if bar is not None:
            bar.close()
    if stats.documents == 0:
        raise DataError(f"{', '.join(inputs)}: no documents to train on.")
    stats.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    stats.path = write_tokenizer_folder(tok, output_dir)
    stats.seconds = time.perf_counter() - start
    return stats


def write_tokenizer_folder(tok, output_dir: str) -> str:
    """Write a ``tokenizers.Tokenizer`` whose end-of-document token is ``<|endoftext|>`` as
    ``output_dir/tokenizer.json`` plus ``tokenizer_config.json`` (each atomically); return the tokenizer.json."""
    os.makedirs(output_dir, exist_ok=True)
    config = {
        # Lets transformers' AutoTokenizer.from_pretrained(output_dir) load the tokenizer as-is.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOD_TOKEN,
        "eos_token": EOD_TOKEN,
        "unk_token": EOD_TOKEN,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    path = os.path.join(output_dir, HF_TOKENIZER_FILE)
    write_text(os.path.join(output_dir, "tokenizer_config.json"), json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_text(path, tok.to_str(pretty=True))
    return path
