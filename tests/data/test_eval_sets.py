"""Named evaluation sets (data.valid_data_path / data.test_data_path) and the run-level tokenizer checks."""

import os

import numpy as np
import pytest

from loop_megatron.checkpoint import tokenizer_for
from loop_megatron.config import ConfigError, preset, set_field, validate
from loop_megatron.data import DataError, IndexedDataset, build_named_eval_datasets, parse_named_data_paths
from loop_megatron.data.dataset_meta import meta_path
from loop_megatron.training import data as tdata

from .conftest import write_jsonl


def test_parse_named_data_paths():
    assert parse_named_data_paths(["kjv=data/c/kjv_text_document", "data/c/sotu_text_document", "x/plain"]) == [
        ("kjv", "data/c/kjv_text_document"), ("sotu", "data/c/sotu_text_document"), ("plain", "x/plain")]
    assert parse_named_data_paths(["a=p/one b=p/two"]) == [("a", "p/one"), ("b", "p/two")]
    assert parse_named_data_paths([]) == []
    # The first '=' separates the name: a prefix containing '=' needs an explicit name.
    assert parse_named_data_paths(["n=d/x=y_text_document"]) == [("n", "d/x=y_text_document")]
    with pytest.raises(DataError, match="^f entry 'd/x=y': the name before '=' must be letters"):
        parse_named_data_paths(["d/x=y"], "f")


@pytest.mark.parametrize("entries, message", [
    (["a=p/x", "a=p/y"], "data.valid_data_path: the name 'a' is used twice; give each set its own NAME=PREFIX."),
    (["p/sotu_text_document", "q/sotu_text_document"], "data.valid_data_path: the name 'sotu' is used twice"),
    (["kjv="], "data.valid_data_path entry 'kjv=': no dataset prefix after '='."),
    (["0.5", "p/x"], "data.valid_data_path entry '0.5': weights are not used here"),
    (["bad name!=p/x"], None),
    (["b@d=p/x"], "data.valid_data_path entry 'b@d=p/x': the name before '=' must be letters, digits"),
])
def test_parse_named_data_paths_errors(entries, message):
    if message is None:  # whitespace splits it into 'bad' and 'name!=p/x'
        with pytest.raises(DataError, match="name before '=' must be"):
            parse_named_data_paths(entries)
        return
    with pytest.raises(DataError) as err:
        parse_named_data_paths(entries)
    assert str(err.value).startswith(message)


def dataset(tmp_path, name, texts=None, tokenizer_type="GPT2BPETokenizer", model=None):
    from loop_megatron.data import preprocess

    texts = texts or [f"{name} document {i}: " + "words and more words " * (5 + i) for i in range(12)]
    src = write_jsonl(tmp_path / f"{name}.jsonl", texts)
    preprocess(src, str(tmp_path / name), append_eod=True, progress=False, tokenizer_type=tokenizer_type,
               tokenizer_model=model)
    return str(tmp_path / f"{name}_text_document")


def config(tmp_path, train, **values):
    cfg = preset("tiny-2l-2loop")
    base = {"data.data_path": [train], "data.seq_length": 16, "data.split": "80,20,0",
            "data.data_cache_path": str(tmp_path / "cache"), "training.micro_batch_size": 2,
            "training.eval_iters": 3, "model.max_position_embeddings": 32}
    base.update(values)
    for k, v in base.items():
        set_field(cfg, k, v, "test")
    return cfg


def test_named_sets_are_whole_datasets_in_order(tmp_path):
    a, b = dataset(tmp_path, "alpha"), dataset(tmp_path, "beta")
    sets = build_named_eval_datasets(parse_named_data_paths([f"second={b}", a]), 16, seed=1)
    assert list(sets) == ["second", "alpha"]
    for ds, prefix in zip(sets.values(), (b, a)):
        assert ds.document_range == (0, IndexedDataset(prefix).num_documents)
        # One epoch covers every token of the dataset once as a label.
        assert len(ds) == (IndexedDataset(prefix).num_tokens - 1) // 16


def test_build_eval_datasets_from_config(tmp_path):
    train, held = dataset(tmp_path, "train"), dataset(tmp_path, "held")
    cfg = config(tmp_path, train, **{"data.valid_data_path": [f"heldout={held}", train]})
    tdata.check_eval_data_paths(cfg)
    sets = tdata.build_eval_datasets(cfg, dp_size=2)
    assert list(sets) == ["heldout", "train"]
    assert all(len(ds) == 3 * 2 * 2 for ds in sets.values())  # eval_iters x micro x DP
    assert sets["heldout"][0]["tokens"].shape == (17,)
    # Without named sets: the valid split of data_path, named 'valid'; the test split is empty here.
    plain = config(tmp_path, train)
    default = tdata.build_eval_datasets(plain, dp_size=1)
    assert list(default) == ["valid"] and default["valid"].split_name == "valid"
    assert tdata.build_eval_datasets(plain, dp_size=1, which="test") == {}
    test_named = config(tmp_path, train, **{"data.test_data_path": [f"t={held}"]})
    assert list(tdata.build_eval_datasets(test_named, dp_size=1, which="test")) == ["t"]


def test_missing_eval_set_names_field_and_file(tmp_path):
    train = dataset(tmp_path, "train")
    cfg = config(tmp_path, train, **{"data.test_data_path": [f"gone={tmp_path}/nothing"]})
    with pytest.raises(ConfigError, match=rf"^data.test_data_path: {tmp_path}/nothing.bin \(set 'gone'\) does not exist"):
        tdata.check_eval_data_paths(cfg)
    cfg = config(tmp_path, train, **{"data.valid_data_path": ["x=a", "x=b"]})
    with pytest.raises(DataError, match="^data.valid_data_path: the name 'x' is used twice"):
        tdata.check_eval_data_paths(cfg)


def test_run_tokenizer_checks(tmp_path, tiny_tokenizer_dir):
    train = dataset(tmp_path, "train")
    held_hf = dataset(tmp_path, "held", tokenizer_type="HuggingFaceTokenizer", model=tiny_tokenizer_dir)
    cfg = config(tmp_path, train, **{"data.valid_data_path": [held_hf]})
    tok = tokenizer_for(cfg, fit_model_vocab=True)
    assert tok.tokenizer_type == "GPT2BPETokenizer"
    with pytest.raises(DataError, match=rf"^{held_hf}.meta.json: the dataset was made by HuggingFaceTokenizer"):
        tdata.check_data_tokenizers(cfg, tok)
    # The model's vocabulary must hold the tokenizer's.
    hf_cfg = config(tmp_path, held_hf, **{"data.tokenizer_type": "HuggingFaceTokenizer",
                                          "data.tokenizer_model": tiny_tokenizer_dir, "model.vocab_size": 300})
    with pytest.raises(ConfigError, match=r"model.vocab_size \(300\) is smaller than the vocabulary of the tokenizer .* \(400\); set model.vocab_size=400"):
        tokenizer_for(hf_cfg, fit_model_vocab=True)
    set_field(hf_cfg, "model.vocab_size", 400, "test")
    assert tdata.check_data_tokenizers(hf_cfg, tokenizer_for(hf_cfg, fit_model_vocab=True)) == []
    # Older datasets (no record) are accepted as GPT-2 with a note.
    os.remove(meta_path(train))
    notes = tdata.check_data_tokenizers(config(tmp_path, train), tok)
    assert len(notes) == 1 and "taken as GPT2BPETokenizer" in notes[0]


def test_config_validates_tokenizer_fields():
    cfg = preset("tiny-2l-2loop")
    set_field(cfg, "data.tokenizer_type", "HuggingFaceTokenizer", "test")
    with pytest.raises(ConfigError, match="data.tokenizer_model must name a tokenizer.json"):
        validate(cfg)
    set_field(cfg, "data.tokenizer_type", "Llama", "test")
    with pytest.raises(ConfigError, match="data.tokenizer_type must be 'GPT2BPETokenizer' or 'HuggingFaceTokenizer', got 'Llama'"):
        validate(cfg)
