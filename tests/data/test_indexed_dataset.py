"""MMIDIDX reader/writer: round trips, megatron-core interoperability, clear errors on bad files."""

import os
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest

from loop_megatron.data import DataError, IndexedDataset, IndexedDatasetBuilder
from loop_megatron.data.merge import merge_datasets

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_docs(seed=0, n=20, vocab=50257):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(0, 40))).tolist() for _ in range(n)]


def write(prefix, docs, dtype=np.uint16):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for doc in docs:
        builder.add_document(doc)
    builder.finalize(prefix + ".idx")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_round_trip(tmp_path, dtype):
    docs = make_docs(n=30) + [[]]
    prefix = str(tmp_path / "ds")
    write(prefix, docs, dtype)
    ds = IndexedDataset(prefix)
    assert len(ds) == ds.num_documents == len(docs)
    assert ds.dtype == np.dtype(dtype)
    assert [d.tolist() for d in ds[: len(ds)]] == docs
    assert ds.sequence_lengths.tolist() == [len(d) for d in docs]
    assert ds.document_indices.tolist() == list(range(len(docs) + 1))
    long = max(range(len(docs)), key=lambda i: len(docs[i]))
    assert ds.get(long, 2, 5).tolist() == docs[long][2:7]
    assert ds.get(long, 3).tolist() == docs[long][3:]
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]  # no temporary files left


def test_add_documents_bulk_matches_one_by_one(tmp_path):
    docs = make_docs(1)
    write(str(tmp_path / "a"), docs)
    builder = IndexedDatasetBuilder(str(tmp_path / "b.bin"))
    builder.add_documents(np.concatenate([np.array(d, np.int64) for d in docs]), [len(d) for d in docs])
    builder.finalize(str(tmp_path / "b.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / ("a" + ext)).read_bytes() == (tmp_path / ("b" + ext)).read_bytes()


def test_builder_abort_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(str(tmp_path / "x.bin")) as builder:
            builder.add_document([1, 2, 3])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def _megatron_indexed():
    try:
        with warnings.catch_warnings():  # megatron-core warns that apex/TE are absent; irrelevant here
            warnings.simplefilter("ignore")
            import megatron.core.datasets.indexed_dataset as mcore
    except Exception as err:  # pragma: no cover - depends on the environment
        pytest.skip(f"megatron-core cannot be imported ({type(err).__name__}: {err})")
    return mcore


def test_megatron_core_reads_our_files(tmp_path):
    mcore = _megatron_indexed()
    docs = make_docs(2, n=25)
    prefix = str(tmp_path / "ours")
    write(prefix, docs)
    theirs = mcore.IndexedDataset(prefix)
    assert len(theirs) == len(docs)
    assert [theirs[i].tolist() for i in range(len(docs))] == docs
    assert theirs.document_indices.tolist() == list(range(len(docs) + 1))
    assert theirs.index.dtype == np.uint16


def test_we_read_megatron_core_files(tmp_path):
    mcore = _megatron_indexed()
    docs = [d for d in make_docs(3, n=25) if d]
    prefix = str(tmp_path / "theirs")
    builder = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(np.array(doc, dtype=np.int64), [len(doc)])
    builder.finalize(prefix + ".idx")
    ours = IndexedDataset(prefix)
    assert [ours[i].tolist() for i in range(len(ours))] == docs
    assert ours.num_documents == len(docs)


def test_truncated_bin_is_a_clear_error(tmp_path):
    prefix = str(tmp_path / "ds")
    write(prefix, make_docs(4))
    data = (tmp_path / "ds.bin").read_bytes()
    (tmp_path / "ds.bin").write_bytes(data[:-6])
    with pytest.raises(DataError, match="ds.bin: token file is .* truncated"):
        IndexedDataset(prefix)


def test_truncated_idx_is_a_clear_error(tmp_path):
    prefix = str(tmp_path / "ds")
    write(prefix, make_docs(5))
    data = (tmp_path / "ds.idx").read_bytes()
    (tmp_path / "ds.idx").write_bytes(data[:-8])
    with pytest.raises(DataError, match="ds.idx: index is .* truncated"):
        IndexedDataset(prefix)


def test_foreign_files_are_clear_errors(tmp_path):
    prefix = str(tmp_path / "ds")
    (tmp_path / "ds.idx").write_bytes(b"{'not': 'an index'}\n" * 4)
    (tmp_path / "ds.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match=r"ds\.idx: not a Megatron MMIDIDX index file"):
        IndexedDataset(prefix)
    (tmp_path / "ds.idx").write_bytes(struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 2, 8, 0, 1) + b"\0" * 8)
    with pytest.raises(DataError, match="unsupported MMIDIDX version 2"):
        IndexedDataset(prefix)
    (tmp_path / "ds.idx").write_bytes(struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, 42, 0, 1) + b"\0" * 8)
    with pytest.raises(DataError, match="unknown token dtype code 42"):
        IndexedDataset(prefix)
    with pytest.raises(DataError, match="missing.idx: cannot read"):
        IndexedDataset(str(tmp_path / "missing"))


def test_merge_tool_round_trip(tmp_path):
    a, b = make_docs(6), make_docs(7)
    write(str(tmp_path / "a"), a)
    write(str(tmp_path / "b"), b)
    out = str(tmp_path / "merged")
    proc = subprocess.run(
        [sys.executable, "tools/merge_datasets.py", "--input", str(tmp_path / "a"), str(tmp_path / "b"),
         "--output-prefix", out],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    merged = IndexedDataset(out)
    assert [d.tolist() for d in merged[: len(merged)]] == a + b
    assert merged.document_indices.tolist() == list(range(len(a) + len(b) + 1))


def test_merge_refuses_mixed_dtypes(tmp_path):
    write(str(tmp_path / "a"), make_docs(8), np.uint16)
    write(str(tmp_path / "b"), make_docs(9), np.int32)
    with pytest.raises(DataError, match="b.idx: tokens are int32"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.idx", "b.bin", "b.idx"]
