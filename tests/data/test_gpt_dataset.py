"""GPTDataset windows, splits, epochs, cache reuse and concurrent builds; BlendedDataset weights."""

import glob
import multiprocessing
import os

import numpy as np
import pytest

from loop_megatron.data import (
    BlendedDataset,
    DataError,
    GPTDataset,
    IndexedDataset,
    IndexedDatasetBuilder,
    build_train_valid_test_datasets,
    parse_data_path,
    split_document_ranges,
)


def make_dataset(path, n_docs=50, seed=0, base=0, max_len=60):
    """Documents of random length whose tokens are unique positions (base + running count)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len, size=n_docs)
    lengths[7] = 0  # an empty document must not break the sample index
    builder = IndexedDatasetBuilder(path + ".bin", np.int32)
    pos = base
    for n in lengths:
        builder.add_document(np.arange(pos, pos + n))
        pos += n
    builder.finalize(path + ".idx")
    return IndexedDataset(path)


def stream(ds, doc_order):
    return np.concatenate([ds[int(d)] for d in doc_order])


def test_windows_are_contiguous_within_an_epoch(tmp_path):
    ds = make_dataset(str(tmp_path / "d"))
    seq = 16
    gpt = GPTDataset(ds, "train", (0, 50), seq, seed=3, cache_dir=str(tmp_path / "c"))
    tokens = stream(ds, gpt.doc_index)  # the epoch's token stream, in its shuffled document order
    assert sorted(gpt.doc_index.tolist()) == list(range(50))
    assert len(gpt) == (len(tokens) - 1) // seq
    windows = [gpt.window(i) for i in range(len(gpt))]
    for i, w in enumerate(windows):
        assert w.dtype == np.int64 and w.shape == (seq + 1,)
        assert w.tolist() == tokens[i * seq : i * seq + seq + 1].tolist()
        if i + 1 < len(windows):
            assert w[-1] == windows[i + 1][0]
    # Items are the same windows in shuffled order, each exactly once.
    assert sorted(gpt.shuffle_index.tolist()) == list(range(len(gpt)))
    for i in (0, 5, len(gpt) - 1):
        assert gpt[i]["tokens"].tolist() == windows[gpt.shuffle_index[i]].tolist()


def test_unshuffled_windows_follow_document_order(tmp_path):
    ds = make_dataset(str(tmp_path / "d"))
    gpt = GPTDataset(ds, "train", (10, 30), 8, shuffle=False, cache_dir=str(tmp_path / "c"))
    tokens = stream(ds, range(10, 30))
    got = np.concatenate([gpt[i]["tokens"][:-1] for i in range(len(gpt))])
    assert got.tolist() == tokens[: len(got)].tolist()


def test_more_samples_than_one_epoch_reshuffles(tmp_path):
    ds = make_dataset(str(tmp_path / "d"))
    one_epoch = len(GPTDataset(ds, "train", (0, 50), 16, cache_dir=str(tmp_path / "c")))
    gpt = GPTDataset(ds, "train", (0, 50), 16, num_samples=3 * one_epoch + 5, cache_dir=str(tmp_path / "c"))
    assert len(gpt) == 3 * one_epoch + 5
    epochs = gpt.doc_index.reshape(-1, 50)
    assert len(epochs) == 4
    assert all(sorted(e.tolist()) == list(range(50)) for e in epochs)
    assert len({tuple(e) for e in epochs.tolist()}) == 4  # a different order each epoch
    # The samples starting in the first epoch are all served before any sample of a later epoch.
    starting_in_first = -(-int(ds.sequence_lengths.sum()) // 16)
    first = gpt.shuffle_index[:starting_in_first]
    assert sorted(first.tolist()) == list(range(starting_in_first))
    tokens = stream(ds, gpt.doc_index)
    assert gpt[len(gpt) - 1]["tokens"].tolist() == tokens[gpt.shuffle_index[len(gpt) - 1] * 16 :][:17].tolist()


def test_splits_do_not_share_documents(tmp_path):
    prefix = str(tmp_path / "d")
    ds = make_dataset(prefix, n_docs=100, max_len=200)
    train, valid, test = build_train_valid_test_datasets([prefix], "80,15,5", 16, seed=1,
                                                         cache_dir=str(tmp_path / "c"))
    ranges = split_document_ranges(100, "80,15,5")
    assert ranges == [(0, 80), (80, 95), (95, 100)]
    owner = np.repeat(np.arange(100), ds.sequence_lengths)  # token value -> document (values are positions)
    for split, (lo, hi) in zip((train, valid, test), ranges):
        assert set(split.doc_index.tolist()) <= set(range(lo, hi))
        seen = np.unique(np.concatenate([split[i]["tokens"] for i in range(len(split))]))
        assert ((owner[seen] >= lo) & (owner[seen] < hi)).all()


def test_split_rounding_matches_megatron():
    assert split_document_ranges(249, "949,50,1") == [(0, 237), (237, 249), (249, 249)]
    assert split_document_ranges(10, "1") == [(0, 10), (10, 10), (10, 10)]
    with pytest.raises(DataError, match="split 'a,b'"):
        split_document_ranges(10, "a,b")


def test_cache_is_reused_and_keyed(tmp_path):
    ds = make_dataset(str(tmp_path / "d"))
    cache = str(tmp_path / "c")
    first = GPTDataset(ds, "train", (0, 50), 16, seed=5, num_samples=100, cache_dir=cache)
    again = GPTDataset(ds, "train", (0, 50), 16, seed=5, num_samples=100, cache_dir=cache)
    assert first.cache_built and not again.cache_built
    assert again.shuffle_index.tolist() == first.shuffle_index.tolist()
    other_seed = GPTDataset(ds, "train", (0, 50), 16, seed=6, num_samples=100, cache_dir=cache)
    assert other_seed.cache_built
    assert not glob.glob(os.path.join(cache, "*.tmp-*"))


def _open_concurrently(prefix, cache, barrier, results):
    barrier.wait()
    gpt = GPTDataset(IndexedDataset(prefix), "train", (0, 400), 8, seed=9, num_samples=200_000, cache_dir=cache)
    results.put((gpt.cache_built, gpt.shuffle_index.sum(dtype=np.int64).item(), gpt.sample_index.sum().item(),
                 gpt[123]["tokens"].tolist()))


def test_concurrent_build_from_two_processes(tmp_path):
    prefix = str(tmp_path / "d")
    make_dataset(prefix, n_docs=400)
    cache = str(tmp_path / "c")
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_open_concurrently, args=(prefix, cache, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    out = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(o[0] for o in out) == [False, True]  # exactly one process built the cache
    assert out[0][1:] == out[1][1:]
    assert len(glob.glob(os.path.join(cache, "*-description.json"))) == 1
    assert not glob.glob(os.path.join(cache, "*.tmp-*"))


def test_blending_respects_weights(tmp_path):
    a = make_dataset(str(tmp_path / "a"), seed=1)
    b = make_dataset(str(tmp_path / "b"), seed=2, base=100_000)
    n = 2000
    weights = [0.7, 0.3]
    parts = [GPTDataset(ds, "train", (0, 50), 8, num_samples=c, cache_dir=str(tmp_path / "c"))
             for ds, c in zip((a, b), (1500, 700))]
    blend = BlendedDataset(parts, weights, n, cache_dir=str(tmp_path / "c"))
    assert len(blend) == n
    share = np.mean(blend.dataset_index == 0)
    assert abs(share - 0.7) < 0.01
    for i in (0, 1, 2, 500, n - 1):
        from_b = blend[i]["tokens"][0] >= 100_000
        assert from_b == (blend.dataset_index[i] == 1)
    # Every prefix of the blend tracks the weights, not just the whole.
    assert abs(np.mean(blend.dataset_index[:100] == 0) - 0.7) <= 0.02


def test_builder_with_weighted_data_path(tmp_path):
    make_dataset(str(tmp_path / "a"), seed=1, n_docs=60)
    make_dataset(str(tmp_path / "b"), seed=2, n_docs=60, base=100_000)
    data_path = ["0.25", str(tmp_path / "a"), "0.75", str(tmp_path / "b")]
    assert parse_data_path(data_path) == [(0.25, str(tmp_path / "a")), (0.75, str(tmp_path / "b"))]
    train, valid, test = build_train_valid_test_datasets(data_path, "90,10,0", 8, seed=1,
                                                         num_samples=(1000, None, None))
    assert test is None
    assert len(train) == 1000 and isinstance(train, BlendedDataset)
    assert abs(np.mean(train.dataset_index == 1) - 0.75) < 0.01
    from_b = np.array([train[i]["tokens"][0] >= 100_000 for i in range(len(train))])
    assert abs(from_b.mean() - 0.75) < 0.01
    assert len(valid) > 0 and valid[len(valid) - 1]["tokens"].shape == (9,)
    assert os.path.isdir(tmp_path / "index_cache")  # default: cached beside the data


def test_too_small_split_is_a_clear_error(tmp_path):
    ds = make_dataset(str(tmp_path / "d"), n_docs=10, max_len=5)
    with pytest.raises(DataError, match="valid split .* fewer than seq_length"):
        GPTDataset(ds, "valid", (9, 10), 1024, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="gives the test set no documents"):
        build_train_valid_test_datasets([str(tmp_path / "d")], "100,0,0", 4, 1, num_samples=(10, 0, 5))


def test_datasets_pickle_by_reference(tmp_path):
    import pickle

    a = make_dataset(str(tmp_path / "a"), seed=1)
    b = make_dataset(str(tmp_path / "b"), seed=2, base=100_000)
    parts = [GPTDataset(ds, "train", (0, 50), 8, num_samples=60, cache_dir=str(tmp_path / "c")) for ds in (a, b)]
    blend = BlendedDataset(parts, [0.5, 0.5], 100, cache_dir=str(tmp_path / "c"))
    blob = pickle.dumps(blend)
    assert len(blob) < 5_000  # file names and small metadata, not token or index arrays
    copy = pickle.loads(blob)
    assert all(copy[i]["tokens"].tolist() == blend[i]["tokens"].tolist() for i in range(len(blend)))


def test_torch_dataloader_batches(tmp_path):
    torch = pytest.importorskip("torch")
    ds = make_dataset(str(tmp_path / "d"))
    gpt = GPTDataset(ds, "train", (0, 50), 16, cache_dir=str(tmp_path / "c"))
    batch = next(iter(torch.utils.data.DataLoader(gpt, batch_size=4)))["tokens"]
    assert batch.dtype == torch.int64 and batch.shape == (4, 17)
    assert batch[1].tolist() == gpt[1]["tokens"].tolist()
