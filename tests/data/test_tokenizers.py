"""Tokenizer abstraction and trained tokenizers: determinism, round trips, byte lengths, hashes, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from loop_megatron.data import DataError, build_tokenizer
from loop_megatron.data.tokenizer import EOD_ID, canonical_tokenizer_sha256, tokenizer_record
from loop_megatron.data.tokenizer_training import train_bpe_tokenizer

from .conftest import MULTILINGUAL, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hf(path):
    return build_tokenizer("HuggingFaceTokenizer", path)


def test_training_is_deterministic(tmp_path, tiny_jsonl, tiny_tokenizer_dir):
    again = train_bpe_tokenizer([tiny_jsonl], 400, str(tmp_path / "again"), progress=False)
    with open(os.path.join(tiny_tokenizer_dir, "tokenizer.json"), "rb") as a, open(again.path, "rb") as b:
        assert a.read() == b.read()
    # A different vocabulary size is a different tokenizer, with a different hash.
    other = train_bpe_tokenizer([tiny_jsonl], 350, str(tmp_path / "other"), progress=False)
    assert hf(other.path).sha256 != hf(tiny_tokenizer_dir).sha256
    assert sorted(os.listdir(tmp_path / "again")) == ["tokenizer.json", "tokenizer_config.json"]


def test_trained_tokenizer_interface(tiny_tokenizer_dir):
    tok = hf(tiny_tokenizer_dir)
    assert tok.tokenizer_type == "HuggingFaceTokenizer"
    assert tok.vocab_size == 400 and tok.eod == 0 and tok.decode([tok.eod]) == "<|endoftext|>"
    assert build_tokenizer("HuggingFaceTokenizer", os.path.join(tiny_tokenizer_dir, "tokenizer.json")).sha256 == tok.sha256
    # The literal special-token string in text is ordinary text, as for GPT-2.
    assert tok.eod not in tok.encode("a <|endoftext|> b")
    rec = tokenizer_record(tok)
    assert rec["type"] == "HuggingFaceTokenizer" and rec["model"] == "tokenizer.json" and rec["vocab_size"] == 400


@pytest.mark.parametrize("kind", ["hf", "gpt2"])
def test_round_trip_multilingual(kind, tiny_tokenizer_dir):
    tok = hf(tiny_tokenizer_dir) if kind == "hf" else build_tokenizer()
    texts = MULTILINGUAL + ["", " ", "x" * 500, "The Congress of the United States"]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert [a.tolist() for a in tok.encode_arrays(texts)] == [tok.encode(t) for t in texts]


@pytest.mark.parametrize("kind", ["hf", "gpt2"])
def test_token_byte_lengths_match_decoded_bytes(kind, tiny_tokenizer_dir):
    tok = hf(tiny_tokenizer_dir) if kind == "hf" else build_tokenizer()
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.vocab_size,) and lengths[tok.eod] == 0
    assert (np.delete(lengths, tok.eod) >= 1).all()
    # Sum over a text's tokens == the UTF-8 length of the text, whatever the script.
    for text in MULTILINGUAL + ["The Congress of the United States"]:
        ids = tok.encode(text)
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    # Every token that decodes to valid UTF-8 on its own has exactly that many bytes.
    checked = 0
    for i in range(0, tok.vocab_size, 7 if kind == "hf" else 97):
        if i == tok.eod:
            continue
        piece = tok.decode([i])
        if "\ufffd" not in piece:
            assert lengths[i] == len(piece.encode("utf-8")), i
            checked += 1
    assert checked > 20


def test_gpt2_record_and_errors(tmp_path):
    tok = build_tokenizer("GPT2BPETokenizer")
    assert tok.eod == EOD_ID and tok.vocab_size == 50257 and len(tok.sha256) == 64
    assert build_tokenizer() is tok  # cached per process
    with pytest.raises(DataError, match="not one of"):
        build_tokenizer("SentencePieceTokenizer")
    with pytest.raises(DataError, match="needs --tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer")
    with pytest.raises(DataError, match="GPT2BPETokenizer takes its files"):
        build_tokenizer("GPT2BPETokenizer", str(tmp_path))
    with pytest.raises(DataError, match=f"{tmp_path}: folder holds no tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a readable tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", str(bad))


def test_tokenizer_without_end_of_document_token_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="no end-of-document token"):
        hf(str(tmp_path))


def test_hash_ignores_formatting_and_runtime_settings(tmp_path, tiny_tokenizer_dir):
    src = os.path.join(tiny_tokenizer_dir, "tokenizer.json")
    spec = json.load(open(src, encoding="utf-8"))
    spec["truncation"] = {"max_length": 8, "strategy": "LongestFirst", "stride": 0, "direction": "Right"}
    copy = tmp_path / "tokenizer.json"
    copy.write_text(json.dumps(spec))  # no indentation, truncation set
    assert canonical_tokenizer_sha256(str(copy)) == canonical_tokenizer_sha256(src)
    spec["model"]["merges"] = spec["model"]["merges"][:-1]
    copy.write_text(json.dumps(spec))
    assert canonical_tokenizer_sha256(str(copy)) != canonical_tokenizer_sha256(src)


def test_cli_several_inputs(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, text in enumerate(MULTILINGUAL):
        (folder / f"{i}.txt").write_text(text * 20, encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "a.jsonl", ["The State of the Union is strong. " * 50])
    cmd = [sys.executable, "tools/train_tokenizer.py", "--input", jsonl, str(folder), "--vocab-size", "300",
           "--output", str(tmp_path / "tok"), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Trained a 300-token byte-level BPE on 8 documents" in proc.stdout
    tok = hf(str(tmp_path / "tok"))
    assert tok.decode(tok.encode(MULTILINGUAL[1])) == MULTILINGUAL[1]
    proc = subprocess.run(cmd[:5] + ["--vocab-size", "100", "--output", str(tmp_path / "x")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: --vocab-size 100: must be at least 257 (256 bytes + <|endoftext|>)."
