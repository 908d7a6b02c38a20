"""Dataset tokenizer records (.meta.json): written with the data, carried by merges, checked against the model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from loop_megatron.data import DataError, IndexedDataset, IndexedDatasetBuilder, build_tokenizer, preprocess
from loop_megatron.data.dataset_meta import meta_path, read_dataset_meta
from loop_megatron.data.indexed_dataset import check_dataset_tokenizer, optimal_dtype
from loop_megatron.data.merge import merge_datasets

from .conftest import MULTILINGUAL, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXTS = MULTILINGUAL + [f"Document {i}: the Congress shall assemble at least once in every year." for i in range(20)]


def make(tmp_path, name, tokenizer_type="GPT2BPETokenizer", model=None, texts=TEXTS):
    src = write_jsonl(tmp_path / f"{name}.jsonl", texts)
    preprocess(src, str(tmp_path / name), append_eod=True, progress=False, tokenizer_type=tokenizer_type,
               tokenizer_model=model)
    return str(tmp_path / f"{name}_text_document")


def test_dtype_follows_vocabulary():
    assert optimal_dtype(400) is np.uint16 and optimal_dtype(50257) is np.uint16
    assert optimal_dtype(65499) is np.uint16 and optimal_dtype(65500) is np.int32 and optimal_dtype(128256) is np.int32


def test_sidecar_records_the_tokenizer(tmp_path, tiny_tokenizer_dir):
    tok = build_tokenizer("HuggingFaceTokenizer", tiny_tokenizer_dir)
    prefix = make(tmp_path, "hf", "HuggingFaceTokenizer", tiny_tokenizer_dir)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16
    assert ds[0].tolist() == tok.encode(TEXTS[0]) + [tok.eod]
    meta = read_dataset_meta(prefix)
    assert meta["tokenizer"] == tok.describe()
    assert meta["num_documents"] == len(TEXTS) == ds.num_documents and meta["num_tokens"] == ds.num_tokens
    assert meta["max_token_id"] == int(ds.tokens.max()) and meta["dtype"] == "uint16"
    assert check_dataset_tokenizer(prefix, tok, tok.vocab_size) == ""


def test_large_vocabulary_gives_int32(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from loop_megatron.data.tokenizer import _byte_decoder

    vocab = {c: i for i, c in enumerate(sorted(_byte_decoder(), key=_byte_decoder().get))}
    vocab.update({f"tok{i}": 256 + i for i in range(70_000 - 257)})
    vocab["<|endoftext|>"] = 69_999
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<|endoftext|>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    assert tok.vocab_size == 70_000 and tok.eod == 69_999
    prefix = make(tmp_path, "big", "HuggingFaceTokenizer", str(tmp_path), texts=TEXTS[:3])
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.int32 and ds[0][-1] == 69_999
    assert tok.decode(ds[0][:-1]) == TEXTS[0]


def test_mismatched_tokenizer_is_refused_naming_the_file(tmp_path, tiny_tokenizer_dir):
    gpt2 = make(tmp_path, "g")
    hf_tok = build_tokenizer("HuggingFaceTokenizer", tiny_tokenizer_dir)
    with pytest.raises(DataError) as err:
        check_dataset_tokenizer(gpt2, hf_tok, 50257)
    msg = str(err.value)
    assert msg.startswith(f"{gpt2}.meta.json: the dataset was made by GPT2BPETokenizer gpt2 (vocab 50257")
    assert "but the model uses HuggingFaceTokenizer" in msg and "\n" not in msg


def test_ids_beyond_the_model_vocabulary_are_refused(tmp_path):
    prefix = make(tmp_path, "g")
    gpt2 = build_tokenizer()
    with pytest.raises(DataError, match=r"tokenizer has 50257 tokens, more than the model's vocabulary \(model.vocab_size = 1000\)"):
        check_dataset_tokenizer(prefix, gpt2, 1000)
    # Without the record (an older dataset) the .bin is scanned for its largest id.
    os.remove(meta_path(prefix))
    top = int(IndexedDataset(prefix).tokens.max())
    with pytest.raises(DataError, match=f"{prefix}.bin holds token id {top}, outside the model's vocabulary of {top}"):
        check_dataset_tokenizer(prefix, gpt2, top)
    note = check_dataset_tokenizer(prefix, gpt2, top + 1)
    assert "no tokenizer record" in note and "taken as GPT2BPETokenizer" in note


def test_legacy_dataset_is_gpt2(tmp_path, tiny_tokenizer_dir):
    prefix = make(tmp_path, "g")
    os.remove(meta_path(prefix))
    assert "taken as GPT2BPETokenizer" in check_dataset_tokenizer(prefix, build_tokenizer(), 50257)
    with pytest.raises(DataError, match=f"{prefix}.bin has no tokenizer record"):
        check_dataset_tokenizer(prefix, build_tokenizer("HuggingFaceTokenizer", tiny_tokenizer_dir), 400)


def test_merge_carries_the_record_and_refuses_mixed_tokenizers(tmp_path, tiny_tokenizer_dir):
    a = make(tmp_path, "a", "HuggingFaceTokenizer", tiny_tokenizer_dir)
    b = make(tmp_path, "b", "HuggingFaceTokenizer", tiny_tokenizer_dir, texts=TEXTS[::-1])
    out = str(tmp_path / "ab")
    assert merge_datasets([a, b], out) == 2 * len(TEXTS)
    meta, ma, mb = read_dataset_meta(out), read_dataset_meta(a), read_dataset_meta(b)
    assert meta["tokenizer"] == ma["tokenizer"]
    assert meta["num_tokens"] == ma["num_tokens"] + mb["num_tokens"] == IndexedDataset(out).num_tokens
    assert meta["max_token_id"] == max(ma["max_token_id"], mb["max_token_id"])

    g = make(tmp_path, "g")
    with pytest.raises(DataError, match=f"{g}.meta.json: made by GPT2BPETokenizer .*datasets of different tokenizers cannot be merged"):
        merge_datasets([a, g], str(tmp_path / "bad"))
    assert not os.path.exists(str(tmp_path / "bad.bin")) and not os.path.exists(meta_path(str(tmp_path / "bad")))

    # Older datasets without records merge as GPT-2: with each other (no record) or with recorded GPT-2 data.
    legacy = make(tmp_path, "l")
    os.remove(meta_path(legacy))
    merge_datasets([legacy, legacy], str(tmp_path / "ll"))
    assert read_dataset_meta(str(tmp_path / "ll")) is None
    merge_datasets([legacy, g], str(tmp_path / "lg"))
    assert read_dataset_meta(str(tmp_path / "lg"))["tokenizer"]["type"] == "GPT2BPETokenizer"
    with pytest.raises(DataError, match=f"{legacy}.meta.json is missing, so {legacy} is taken as a GPT2BPETokenizer dataset"):
        merge_datasets([a, legacy], str(tmp_path / "bad"))


def test_merge_cli_reports_mixed_tokenizers(tmp_path, tiny_tokenizer_dir):
    a = make(tmp_path, "a", "HuggingFaceTokenizer", tiny_tokenizer_dir)
    g = make(tmp_path, "g")
    proc = subprocess.run([sys.executable, "tools/merge_datasets.py", "--input", a, g, "--output-prefix",
                           str(tmp_path / "m")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {g}.meta.json: made by GPT2BPETokenizer") and proc.stderr.count("\n") == 1


def test_stale_sidecar_is_removed_and_builder_records_max_id(tmp_path):
    prefix = make(tmp_path, "g")
    assert os.path.exists(meta_path(prefix))
    b = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    b.add_document([5, 900, 7])
    b.add_documents(np.array([1, 2, 3000]), [1, 2])
    assert b.max_token_id == 3000
    b.finalize(prefix + ".idx")  # no record: the old one must not describe the new data
    assert not os.path.exists(meta_path(prefix))


def test_preprocess_cli_with_trained_tokenizer(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "d.jsonl", TEXTS)
    proc = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", src, "--output-prefix",
                           str(tmp_path / "d"), "--append-eod", "--tokenizer-type", "HuggingFaceTokenizer",
                           "--tokenizer-model", tiny_tokenizer_dir, "--workers", "2", "--no-progress"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Tokenizer: HuggingFaceTokenizer" in proc.stdout and "uint16" in proc.stdout
    tok = build_tokenizer("HuggingFaceTokenizer", tiny_tokenizer_dir)
    ds = IndexedDataset(str(tmp_path / "d_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) + [tok.eod] for t in TEXTS]
    assert json.load(open(tmp_path / "d_text_document.meta.json"))["tokenizer"]["sha256"] == tok.sha256
