"""Data pipeline: GPT-2 tokenizer, Megatron indexed datasets, GPT sample windows and blending.

Typical use in the trainer::

    from loop_megatron.data import build_train_valid_test_datasets
    train, valid, test = build_train_valid_test_datasets(
        cfg.data.data_path, cfg.data.split, cfg.data.seq_length, seed,
        num_samples=(train_iters * global_batch, eval_samples, 0), cache_dir=cfg.data.data_cache_path or None)
    batch = next(iter(DataLoader(train, batch_size=8)))["tokens"]   # LongTensor [8, seq_length + 1]
    inputs, labels = batch[:, :-1], batch[:, 1:]
"""

from .corpus import prepare_default_corpus, write_sotu_jsonl
from .errors import DataError
from .gpt_dataset import (
    BlendedDataset,
    GPTDataset,
    build_train_valid_test_datasets,
    parse_data_path,
    parse_split,
    split_document_ranges,
)
from .indexed_dataset import IndexedDataset, IndexedDatasetBuilder, dataset_exists, optimal_dtype
from .preprocess import PreprocessStats, preprocess
from .tokenizer import EOD_ID, VOCAB_SIZE, GPT2Tokenizer, get_gpt2_encoding

__all__ = [
    "BlendedDataset",
    "DataError",
    "EOD_ID",
    "GPT2Tokenizer",
    "GPTDataset",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "PreprocessStats",
    "VOCAB_SIZE",
    "build_train_valid_test_datasets",
    "dataset_exists",
    "get_gpt2_encoding",
    "optimal_dtype",
    "parse_data_path",
    "parse_split",
    "preprocess",
    "prepare_default_corpus",
    "split_document_ranges",
    "write_sotu_jsonl",
]
