"""Answer-masked data: prompt/answer JSONL -> tokens + PREFIX.loss_mask companion -> GPTDataset loss_mask.

Every served mask is compared with a brute-force reconstruction from the JSONL (tokenize each record,
concatenate documents in the dataset's order, cut windows), including windows that span packed documents.
"""

import json
import os
import pickle
import shutil

import numpy as np
import pytest

from loop_megatron.data import (EOD_ID, BlendedDataset, DataError, GPT2Tokenizer, GPTDataset, IndexedDataset,
                                build_train_valid_test_datasets, preprocess)
from loop_megatron.data.merge import merge_datasets
from loop_megatron.data.loss_mask import has_loss_mask, loss_mask_prefix, open_loss_mask

RECORDS = [{"prompt": f"{a} + {b} =", "answer": f" {a + b}"} for a, b in [(2, 3), (17, 25), (100, 1), (7, 8)]] + [
    {"prompt": "Reverse: a b c d e ->", "answer": " e d c b a"},
    {"prompt": "héllo wörld 🙂 repeat:", "answer": " héllo wörld 🙂"},
    {"prompt": "x", "answer": " a much longer answer than its prompt, spanning several tokens of text"},
] + [{"prompt": f"Question {i}: what follows {i}?", "answer": f" {i + 1}"} for i in range(30)]


def write_records(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(dict(r, id=1), ensure_ascii=False) + "\n")
    return str(path)


def expected_documents(records, eod):
    """(tokens, mask) per record, by tokenizing prompt and answer on their own."""
    tok = GPT2Tokenizer()
    out = []
    for r in records:
        p, a = tok.encode(r["prompt"]), tok.encode(r["answer"]) + ([EOD_ID] if eod else [])
        out.append((p + a, [0] * len(p) + [1] * len(a)))
    return out


def masked_prefix(tmp_path, eod=True, workers=1, records=RECORDS, name="qa"):
    src = write_records(tmp_path / f"{name}.jsonl", records)
    stats = preprocess(src, str(tmp_path / name), append_eod=eod, workers=workers, progress=False, chunk_docs=8,
                       answer_key="answer")
    prefix = str(tmp_path / f"{name}_prompt_answer_document")
    assert stats.output_prefixes == {"prompt+answer": prefix}
    return prefix, stats


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("eod", [False, True])
def test_companion_written_and_read_back(tmp_path, workers, eod):
    prefix, stats = masked_prefix(tmp_path, eod, workers)
    tokens, mask = IndexedDataset(prefix), IndexedDataset(loss_mask_prefix(prefix))
    want = expected_documents(RECORDS, eod)
    assert [tokens[i].tolist() for i in range(len(tokens))] == [t for t, _ in want]
    assert [mask[i].tolist() for i in range(len(mask))] == [m for _, m in want]
    assert mask.dtype == np.uint8 and np.array_equal(mask.document_indices, tokens.document_indices)
    assert stats.answer_tokens == sum(sum(m) for _, m in want) and stats.tokens == tokens.num_tokens
    assert os.path.isfile(prefix + ".meta.json") and not os.path.exists(loss_mask_prefix(prefix) + ".meta.json")
    written = [os.path.basename(prefix) + s for s in (".bin", ".idx", ".meta.json", ".loss_mask.bin", ".loss_mask.idx")]
    assert sorted(os.listdir(tmp_path)) == sorted(["qa.jsonl"] + written)  # and no temporaries left behind


def test_megatron_core_reads_tokens_and_mask(tmp_path):
    from tests.data.test_indexed_dataset import _megatron_indexed

    mcore = _megatron_indexed()
    prefix, _ = masked_prefix(tmp_path)
    want = expected_documents(RECORDS, True)
    for path, column in ((prefix, 0), (loss_mask_prefix(prefix), 1)):
        ds = mcore.IndexedDataset(path, mmap=True)
        assert [ds[i].tolist() for i in range(len(ds))] == [w[column] for w in want]


@pytest.mark.parametrize("line, reason", [
    ('{"prompt": "2 + 2 ="}', "no field 'answer'"),
    ('{"prompt": "2 + 2 =", "answer": 4}', "field 'answer' is int, not a string"),
    ('{"answer": " 4"}', "no field 'prompt'"),
    ('{"prompt": "2 + 2 =", "answer": " 4"', "not valid JSON"),
])
def test_bad_record_names_file_and_line_and_leaves_nothing(tmp_path, line, reason):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt": "1 + 1 =", "answer": " 2"}\n' + line + "\n", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        preprocess(str(src), str(out / "x"), answer_key="answer", progress=False)
    message = str(err.value)
    assert message.startswith(f"{src}:2: {reason}") and message.count(".") >= 1, message
    assert not out.exists() or os.listdir(out) == []


def test_answer_key_refuses_json_keys_and_same_fields(tmp_path):
    src = write_records(tmp_path / "qa.jsonl", RECORDS)
    with pytest.raises(DataError, match="--json-keys and --answer-key cannot be combined"):
        preprocess(src, str(tmp_path / "x"), json_keys=["prompt"], answer_key="answer", progress=False)
    with pytest.raises(DataError, match="both name the field 'answer'"):
        preprocess(src, str(tmp_path / "x"), prompt_key="answer", answer_key="answer", progress=False)
    with pytest.raises(DataError, match="--prompt-key needs --answer-key"):
        preprocess(src, str(tmp_path / "x"), prompt_key="prompt", progress=False)


def test_cli_prompt_and_answer_keys(tmp_path):
    import subprocess
    import sys

    from tests.data.test_preprocess import REPO

    src = tmp_path / "qa.jsonl"
    write_records(src, [{"question": r["prompt"], "reply": r["answer"]} for r in RECORDS])
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", str(src),
                           "--output-prefix", str(tmp_path / "q"), "--prompt-key", "question", "--answer-key", "reply",
                           "--append-eod", "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    prefix = str(tmp_path / "q_question_reply_document")
    assert "Loss mask:" in proc.stdout and loss_mask_prefix(prefix) in proc.stdout
    mask = IndexedDataset(loss_mask_prefix(prefix))
    assert [mask[i].tolist() for i in range(len(mask))] == [m for _, m in expected_documents(RECORDS, True)]


def brute_force_windows(records, eod, dataset):
    """Every served (tokens, loss_mask) of ``dataset``, rebuilt from the records: the dataset's document order
    (doc_index) over the record token lists, cut into windows of seq_length + 1 sharing one token."""
    docs = expected_documents(records, eod)
    stream = [t for d in dataset.doc_index for t in docs[d][0]]
    flags = [m for d in dataset.doc_index for m in docs[d][1]]
    L = dataset.seq_length
    out = []
    for idx in range(len(dataset)):
        s = int(dataset.shuffle_index[idx]) * L
        out.append((stream[s:s + L + 1], [float(f) for f in flags[s + 1:s + L + 1]]))
    return out


@pytest.mark.parametrize("seq_length, num_samples", [(5, None), (16, 40), (64, 12)])
def test_gpt_dataset_loss_mask_equals_brute_force(tmp_path, seq_length, num_samples):
    """Short windows (inside documents), ones that span several packed documents, and repeated epochs."""
    prefix, _ = masked_prefix(tmp_path)
    ds = GPTDataset(IndexedDataset(prefix), "train", (0, len(RECORDS)), seq_length, 3, num_samples,
                    str(tmp_path / "cache"))
    assert ds.has_loss_mask
    want = brute_force_windows(RECORDS, True, ds)
    spanning = 0
    for idx, (tokens, mask) in enumerate(want):
        item = ds[idx]
        assert item["tokens"].tolist() == tokens and item["loss_mask"].tolist() == mask, idx
        assert item["loss_mask"].dtype == np.float32 and item["loss_mask"].shape == (seq_length,)
        spanning += EOD_ID in tokens[:-1]
    assert spanning > 0  # some windows do cross a document boundary
    # The indices are those of the same data without its mask (masks change what is served, not the order).
    shutil.copy(prefix + ".bin", tmp_path / "plain.bin")
    shutil.copy(prefix + ".idx", tmp_path / "plain.idx")
    plain = GPTDataset(IndexedDataset(str(tmp_path / "plain")), "train", (0, len(RECORDS)), seq_length, 3,
                       num_samples, str(tmp_path / "cache2"))
    assert not plain.has_loss_mask and set(plain[0]) == {"tokens"}
    assert np.array_equal(plain.shuffle_index, ds.shuffle_index) and np.array_equal(plain.doc_index, ds.doc_index)
    again = pickle.loads(pickle.dumps(ds))  # DataLoader workers get a pickled copy
    assert again[3]["loss_mask"].tolist() == want[3][1]


def test_blend_of_masked_and_unmasked_counts_every_unmasked_target(tmp_path):
    prefix, _ = masked_prefix(tmp_path)
    src = write_records(tmp_path / "plain.jsonl", [{"text": r["prompt"] + r["answer"]} for r in RECORDS])
    preprocess(src, str(tmp_path / "plain"), append_eod=True, progress=False)
    plain = str(tmp_path / "plain_text_document")
    train, _, _ = build_train_valid_test_datasets(["0.5", prefix, "0.5", plain], "100,0,0", 8, 1, (60, 0, 0),
                                                  str(tmp_path / "cache"))
    assert isinstance(train, BlendedDataset) and train.has_loss_mask
    masked_part, plain_part = train.datasets
    for i in range(len(train)):
        k, j = int(train.dataset_index[i]), int(train.dataset_sample_index[i])
        item = train[i]
        if k == 0:
            assert item["loss_mask"].tolist() == masked_part[j]["loss_mask"].tolist()
        else:
            assert item["loss_mask"].tolist() == [1.0] * 8 and item["tokens"].tolist() == plain_part[j]["tokens"].tolist()
    assert {int(k) for k in train.dataset_index} == {0, 1}


def test_mask_of_another_dataset_is_refused(tmp_path):
    prefix, _ = masked_prefix(tmp_path)
    other, _ = masked_prefix(tmp_path, records=RECORDS[:5], name="small")
    for suffix in (".bin", ".idx"):
        shutil.copy(loss_mask_prefix(other) + suffix, loss_mask_prefix(prefix) + suffix)
    with pytest.raises(DataError, match="do not match those of .*belongs to another dataset"):
        open_loss_mask(IndexedDataset(prefix))
    os.remove(loss_mask_prefix(prefix) + ".idx")
    with pytest.raises(DataError, match=r"loss_mask\.idx is missing"):
        GPTDataset(IndexedDataset(prefix), "train", (0, len(RECORDS)), 8, 1)


def test_merge_carries_masks_and_refuses_a_mix(tmp_path):
    a, _ = masked_prefix(tmp_path, records=RECORDS[:10], name="a")
    b, _ = masked_prefix(tmp_path, records=RECORDS[10:], name="b")
    out = str(tmp_path / "ab_prompt_answer_document")
    assert merge_datasets([a, b], out) == len(RECORDS)
    mask = IndexedDataset(loss_mask_prefix(out))
    assert [mask[i].tolist() for i in range(len(mask))] == [m for _, m in expected_documents(RECORDS, True)]
    src = write_records(tmp_path / "plain.jsonl", [{"text": r["prompt"]} for r in RECORDS])
    preprocess(src, str(tmp_path / "plain"), progress=False)
    with pytest.raises(DataError, match="has a loss mask .* but .*plain_text_document has none"):
        merge_datasets([a, str(tmp_path / "plain_text_document")], str(tmp_path / "mix"))
    assert not os.path.exists(tmp_path / "mix.idx") and not has_loss_mask(str(tmp_path / "mix"))


def test_merge_tool_takes_a_folder_of_masked_datasets(tmp_path, monkeypatch):
    from tests.data.test_preprocess import REPO
    from tests.hf.helpers import tool_main

    monkeypatch.syspath_prepend(os.path.join(REPO, "tools"))  # the tool imports its _bootstrap
    folder = tmp_path / "parts"
    folder.mkdir()
    masked_prefix(folder, records=RECORDS[:10], name="a")
    masked_prefix(folder, records=RECORDS[10:], name="b")
    out = str(tmp_path / "ab_prompt_answer_document")
    # The .loss_mask.idx companions in the folder are not datasets of their own.
    assert tool_main("merge_datasets")(["--input", str(folder), "--output-prefix", out]) == 0
    assert IndexedDataset(out).num_documents == len(RECORDS)
    mask = IndexedDataset(loss_mask_prefix(out))
    assert [mask[i].tolist() for i in range(len(mask))] == [m for _, m in expected_documents(RECORDS, True)]
