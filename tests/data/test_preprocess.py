"""preprocess_data: round trips for every input kind and worker count, bad input, skip flag."""

import json
import os
import subprocess
import sys

import pytest

from loop_megatron.data import EOD_ID, DataError, GPT2Tokenizer, IndexedDataset, preprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.\nSecond line.",
    "Unicode: héllo wörld, 日本語, emoji 🙂",
    "A literal <|endoftext|> inside a document stays text.",
    "x" * 3000,
] + [f"Document number {i} with some words." for i in range(40)]


def write_jsonl(path, texts, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({key: t, "id": i}) + "\n")


def read_docs(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def expected(texts, eod):
    tok = GPT2Tokenizer()
    return [tok.encode(t) + ([EOD_ID] if eod else []) for t in texts]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("append_eod", [False, True])
def test_jsonl_round_trip(tmp_path, workers, append_eod):
    src = tmp_path / "data.jsonl"
    write_jsonl(src, TEXTS)
    stats = preprocess(str(src), str(tmp_path / "out"), append_eod=append_eod, workers=workers,
                       chunk_docs=4, progress=False)
    assert read_docs(str(tmp_path / "out_text_document")) == expected(TEXTS, append_eod)
    assert stats.documents == len(TEXTS)
    assert stats.tokens == sum(len(d) for d in expected(TEXTS, append_eod))
    assert sorted(os.listdir(tmp_path)) == ["data.jsonl", "out_text_document.bin", "out_text_document.idx",
                                            "out_text_document.meta.json"]


def test_several_json_keys(tmp_path):
    src = tmp_path / "data.jsonl"
    with open(src, "w") as f:
        for t in TEXTS[:5]:
            f.write(json.dumps({"text": t, "title": t[:5]}) + "\n")
    preprocess(str(src), str(tmp_path / "o"), json_keys=["text", "title"], progress=False)
    assert read_docs(str(tmp_path / "o_text_document")) == expected(TEXTS[:5], False)
    assert read_docs(str(tmp_path / "o_title_document")) == expected([t[:5] for t in TEXTS[:5]], False)


def test_folder_of_txt_glob_and_json_array(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, t in enumerate(TEXTS[:6]):
        (folder / f"{i:02d}.txt").write_text(t, encoding="utf-8")
    preprocess(str(folder), str(tmp_path / "f"), append_eod=True, progress=False)
    assert read_docs(str(tmp_path / "f_text_document")) == expected(TEXTS[:6], True)

    write_jsonl(tmp_path / "a.jsonl", TEXTS[:3])
    write_jsonl(tmp_path / "b.jsonl", TEXTS[3:7])
    preprocess(str(tmp_path / "*.jsonl"), str(tmp_path / "g"), progress=False)
    assert read_docs(str(tmp_path / "g_text_document")) == expected(TEXTS[:7], False)

    (tmp_path / "arr.json").write_text(json.dumps([{"text": t} for t in TEXTS[:4]]))
    preprocess(str(tmp_path / "arr.json"), str(tmp_path / "j"), progress=False)
    assert read_docs(str(tmp_path / "j_text_document")) == expected(TEXTS[:4], False)


def test_hugging_face_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": TEXTS[:8]}).save_to_disk(str(tmp_path / "hf"))
    preprocess(str(tmp_path / "hf"), str(tmp_path / "h"), append_eod=True, progress=False)
    assert read_docs(str(tmp_path / "h_text_document")) == expected(TEXTS[:8], True)


BAD_LINES = {
    "malformed JSON": (b'{"text": "unterminated}\n', "not valid JSON"),
    "missing key": (b'{"body": "no text field"}\n', "no field 'text'"),
    "non-UTF-8": (b'{"text": "caf\xe9"}\n', "not valid UTF-8"),
    "empty document": (b'{"text": "   "}\n', "empty document"),
    "not a string": (b'{"text": 42}\n', "not a string"),
    "not an object": (b'["text"]\n', "expected a JSON object"),
}


def write_with_bad_line(path, bad_line, bad_at=3, n=6):
    good = [json.dumps({"text": f"good document {i}"}).encode() + b"\n" for i in range(n)]
    path.write_bytes(b"".join(good[:bad_at - 1] + [bad_line] + good[bad_at - 1:]))


# Every kind of bad record in-process, plus one through the worker pool (which must clean up too).
@pytest.mark.parametrize("case,workers", [(c, 1) for c in sorted(BAD_LINES)] + [("malformed JSON", 2)])
def test_bad_record_names_file_and_line_and_leaves_nothing(tmp_path, case, workers):
    line, reason = BAD_LINES[case]
    src = tmp_path / "data.jsonl"
    write_with_bad_line(src, line, bad_at=3)
    with pytest.raises(DataError) as info:
        preprocess(str(src), str(tmp_path / "out"), workers=workers, chunk_docs=2, progress=False)
    message = str(info.value)
    assert message.startswith(f"{src}:3: "), message
    assert reason in message
    assert "\n" not in message
    assert os.listdir(tmp_path) == ["data.jsonl"]


def test_cli_reports_one_line_and_exits_nonzero(tmp_path):
    src = tmp_path / "data.jsonl"
    write_with_bad_line(src, b"{oops\n", bad_at=17, n=20)
    proc = subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", str(src), "--output-prefix", str(tmp_path / "o"),
         "--no-progress"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {src}:17: not valid JSON (Expecting property name enclosed in double quotes at column 2)."]
    assert os.listdir(tmp_path) == ["data.jsonl"]


def test_bad_txt_file_is_named(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "a.txt").write_text("fine")
    (folder / "b.txt").write_bytes(b"bad \xff byte")
    with pytest.raises(DataError, match=r"b\.txt: not valid UTF-8 \(byte 0xff at offset 4\)"):
        preprocess(str(folder), str(tmp_path / "o"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["txt"]


def test_skip_bad_records_counts_and_locates(tmp_path):
    src = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": f"good {i}"}).encode() + b"\n" for i in range(10)]
    lines[1] = b"{broken\n"
    lines[4] = b'{"text": ""}\n'
    lines[7] = b'{"text": "\xff"}\n'
    src.write_bytes(b"".join(lines) + b"\n")  # a trailing blank line is not a record
    stats = preprocess(str(src), str(tmp_path / "o"), skip_bad_records=True, progress=False, chunk_docs=3)
    assert stats.skipped == 3
    assert [e.split(": ")[0] for e in stats.skipped_examples] == [f"{src}:2", f"{src}:5", f"{src}:8"]
    assert stats.documents == 7
    good = [f"good {i}" for i in range(10) if i not in (1, 4, 7)]
    assert read_docs(str(tmp_path / "o_text_document")) == expected(good, False)
    assert "Skipped 3 bad records" in stats.summary()


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file, folder or matching glob"):
        preprocess(str(tmp_path / "nope*.jsonl"), str(tmp_path / "o"), progress=False)
