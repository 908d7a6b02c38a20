"""GPT training samples: fixed windows of ``seq_length + 1`` tokens cut from a stream of documents.

Megatron's scheme, built with numpy and cached (see :mod:`index_cache`):

* ``doc_index``: the split's sequence ids, shuffled, repeated once per epoch (a new order each epoch);
* ``sample_index`` [N + 1, 2]: (position in doc_index, token offset) where window i starts; window i
  runs from boundary i to boundary i + 1 inclusive, so consecutive windows share one token (the last
  input token of one is the first of the next) and every token of the stream is a label exactly once;
* ``shuffle_index``: the order samples are served in, shuffled within each epoch so that a first epoch
  is seen completely before any sample of the second.

Each item is ``{"tokens": np.ndarray int64 [seq_length + 1]}``; the trainer feeds ``tokens[:-1]`` and
predicts ``tokens[1:]``. torch's default collate stacks a batch into a LongTensor [B, seq_length + 1].
A dataset with a loss-mask companion (answer-masked data, :mod:`loss_mask`) adds ``"loss_mask":
np.ndarray float32 [seq_length]``, 1 where the target ``tokens[t + 1]`` is an answer token, cut from the
same windows (so across packed documents too); its indices are those the dataset has without the mask.
"""

import collections
import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import DataError
from .index_cache import description_hash, file_fingerprint, load_arrays, load_or_build
from .indexed_dataset import IndexedDataset, bin_path, idx_path
from .loss_mask import open_loss_mask

SPLIT_NAMES = ("train", "valid", "test")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_split(split: str) -> List[float]:
    """Normalised train/valid/test weights from ``"969,30,1"`` (or ``"969/30/1"``; missing are 0)."""
    parts = [p for p in split.replace("/", ",").split(",") if p.strip()]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise DataError(f"split {split!r}: expected up to three numbers like '969,30,1'.") from None
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"split {split!r}: expected up to three non-negative numbers with a positive sum.")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_document_ranges(num_documents: int, split: str) -> List[Tuple[int, int]]:
    """Contiguous ``[start, end)`` document ranges for train/valid/test (Megatron's rounding)."""
    bounds = [0]
    for w in parse_split(split):
        bounds.append(bounds[-1] + int(round(w * num_documents)))
    excess = bounds[-1] - num_documents
    bounds = [0] + [b - excess for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def parse_data_path(data_path: Sequence[str]) -> List[Tuple[float, str]]:
    """``["0.7", "a", "0.3", "b"]`` or ``["a"]`` -> ``[(weight, prefix), ...]`` with weights summing to 1."""
    items = [tok for entry in data_path for tok in str(entry).split()]
    if not items:
        raise DataError("data_path is empty; give a dataset prefix or weight/prefix pairs.")
    if len(items) == 1:
        return [(1.0, items[0])]
    pairs = []
    if len(items) % 2 == 0:
        try:
            pairs = [(float(items[i]), items[i + 1]) for i in range(0, len(items), 2)]
        except ValueError:
            pairs = []
    if not pairs or any(w < 0 for w, _ in pairs) or sum(w for w, _ in pairs) <= 0:
        raise DataError(
            f"data_path {' '.join(items)!r}: expected one prefix or weight/prefix pairs such as "
            "'0.7 a_text_document 0.3 b_text_document'."
        )
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]


def default_cache_dir(prefix: str) -> str:
    """Where index caches go when no cache_dir is given: ``index_cache/`` beside the data files."""
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "index_cache")


def _build_gpt_indices(
    lengths: np.ndarray, first_seq: int, seq_length: int, num_samples: Optional[int], seed: int,
    shuffle: bool,
) -> Dict[str, np.ndarray]:
    """Compute doc/sample/shuffle indices for sequences ``first_seq + arange(len(lengths))``."""
    tokens_per_epoch = int(lengths.sum())
    if num_samples is None:
        epochs = 1
    else:
        # Smallest number of epochs whose stream holds num_samples windows (+1 token for the last label).
        epochs = max(1, math.ceil((num_samples * seq_length + 1) / tokens_per_epoch))
    rng = np.random.default_rng(seed)
    seq_ids = np.arange(first_seq, first_seq + len(lengths), dtype=np.int64)
    order = [rng.permutation(len(seq_ids)) if shuffle else np.arange(len(seq_ids)) for _ in range(epochs)]
    order = np.concatenate(order)
    doc_index = seq_ids[order]

    cum = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lengths[order], out=cum[1:])
    total = (epochs * tokens_per_epoch - 1) // seq_length
    starts = np.arange(total + 1, dtype=np.int64) * seq_length
    # side="right" skips empty documents: a boundary lands in the last document starting at or before it.
    pos = np.searchsorted(cum, starts, side="right") - 1
    sample_index = np.stack([pos, starts - cum[pos]], axis=1)

    # Shuffle samples within each epoch (samples are assigned to the epoch their first token is in).
    epoch_bounds = np.minimum(-(-np.arange(epochs + 1, dtype=np.int64) * tokens_per_epoch // seq_length), total)
    blocks = []
    for lo, hi in zip(epoch_bounds[:-1], epoch_bounds[1:]):
        block = np.arange(lo, hi, dtype=np.int64)
        blocks.append(rng.permutation(block) if shuffle else block)
    shuffle_index = np.concatenate(blocks) if blocks else np.zeros(0, np.int64)
    return {"doc_index": doc_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


class GPTDataset:
    """Fixed-length token windows over one split of one indexed dataset.

    Args:
        indexed: the opened ``IndexedDataset``.
        split_name: ``"train"``, ``"valid"`` or ``"test"`` (names the cache files; seeds differ per split).
        document_range: ``[start, end)`` documents of ``indexed`` that form this split.
        seq_length: model context; items hold ``seq_length + 1`` tokens.
        seed: shuffling seed.
        num_samples: samples to serve; more than one epoch holds repeats the data in new orders.
            None serves exactly one epoch.
        cache_dir: folder for the cached indices (default ``index_cache/`` beside the data).
        shuffle: False keeps documents and samples in order (for tests and inspection).

    ``cache_built`` is True when this instance computed the indices, False when it loaded a cache.
    ``loss_mask`` is the opened loss-mask companion (:mod:`loss_mask`), or None: items then carry
    ``loss_mask`` too (``has_loss_mask``).
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        split_name: str,
        document_range: Tuple[int, int],
        seq_length: int,
        seed: int = 1234,
        num_samples: Optional[int] = None,
        cache_dir: Optional[str] = None,
        shuffle: bool = True,
    ):
        if seq_length < 1:
            raise DataError(f"seq_length must be positive, got {seq_length}.")
        self.indexed = indexed
        self.loss_mask = open_loss_mask(indexed)
        self.split_name = split_name
        self.document_range = (int(document_range[0]), int(document_range[1]))
        self.seq_length = seq_length
        doc_idx = indexed.document_indices
        first_seq, end_seq = int(doc_idx[self.document_range[0]]), int(doc_idx[self.document_range[1]])
        lengths = np.asarray(indexed.sequence_lengths[first_seq:end_seq], dtype=np.int64)
        available = int(lengths.sum())
        if available < seq_length + 1:
            raise DataError(
                f"{indexed.prefix}: the {split_name} split (documents {self.document_range[0]}-"
                f"{self.document_range[1]}) has {available} tokens, fewer than seq_length + 1 = "
                f"{seq_length + 1}; use a larger split or a shorter sequence."
            )
        split_id = SPLIT_NAMES.index(split_name) if split_name in SPLIT_NAMES else 3
        self.description = {
            "class": "GPTDataset",
            "prefix": os.path.abspath(indexed.prefix),
            "bin": file_fingerprint(bin_path(indexed.prefix)),
            "idx": file_fingerprint(idx_path(indexed.prefix)),
            "split_name": split_name,
            "document_range": list(self.document_range),
            "seq_length": seq_length,
            "seed": seed,
            "num_samples": num_samples,
            "shuffle": shuffle,
        }
        cache_dir = cache_dir or default_cache_dir(indexed.prefix)
        stem = f"{os.path.basename(indexed.prefix)}-{split_name}"
        arrays, self.cache_built, self.cache_base = load_or_build(
            cache_dir,
            stem,
            self.description,
            lambda: _build_gpt_indices(lengths, first_seq, seq_length, num_samples, seed + split_id, shuffle),
        )
        self._attach(arrays)
        self.num_samples = len(self.shuffle_index) if num_samples is None else num_samples
        if self.num_samples > len(self.shuffle_index):
            raise DataError(f"{self.cache_base}: cached index holds fewer samples than requested; delete it.")

    _ARRAYS = ("doc_index", "sample_index", "shuffle_index", "_starts", "_lengths", "_tokens", "_mask_tokens")

    @property
    def has_loss_mask(self) -> bool:
        """Items carry ``loss_mask`` (the dataset has a loss-mask companion)."""
        return self.loss_mask is not None

    def _attach(self, arrays: Dict[str, np.ndarray]) -> None:
        self.doc_index = arrays["doc_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        # Token-array start of each sequence, looked up per sample without going through the reader.
        self._starts = self.indexed.sequence_starts
        self._lengths = self.indexed.sequence_lengths
        self._tokens = self.indexed.tokens
        # The mask has the tokens' sequence lengths (checked on opening), so the same starts index it.
        self._mask_tokens = None if self.loss_mask is None else self.loss_mask.tokens

    # DataLoader workers started with spawn/forkserver receive a pickled copy: send file names, not
    # the mmapped arrays, and reopen them on the other side.
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in self._ARRAYS}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._attach(load_arrays(self.cache_base))

    def __len__(self) -> int:
        return self.num_samples

    def window(self, sample: int) -> np.ndarray:
        """Tokens of un-shuffled sample ``sample`` (position in the stream), int64 [seq_length + 1]."""
        return self._cut(self._tokens, sample).astype(np.int64)

    def loss_mask_window(self, sample: int) -> np.ndarray:
        """Loss mask of un-shuffled sample ``sample``, float32 [seq_length]: target t (token t + 1 of the
        window) counts iff that token is an answer token. Needs a loss-mask companion."""
        return (self._cut(self._mask_tokens, sample)[1:] != 0).astype(np.float32)

    def _cut(self, tokens: np.ndarray, sample: int) -> np.ndarray:
        """Window ``sample`` of the stream, read from ``tokens`` (the token or the mask array: both have the
        sequences at the same element offsets)."""
        d0, o0 = self.sample_index[sample]
        d1, o1 = self.sample_index[sample + 1]
        starts, doc_index = self._starts, self.doc_index
        if d0 == d1:
            s = starts[doc_index[d0]]
            return tokens[s + o0 : s + o1 + 1]
        pieces = []
        s = starts[doc_index[d0]]
        pieces.append(tokens[s + o0 : s + self._lengths[doc_index[d0]]])
        for d in range(d0 + 1, d1):
            s = starts[doc_index[d]]
            pieces.append(tokens[s : s + self._lengths[doc_index[d]]])
        s = starts[doc_index[d1]]
        pieces.append(tokens[s : s + o1 + 1])
        return np.concatenate(pieces)

    def __getitem__(self, idx: int) -> Dict[str, np.ndarray]:
        if idx < 0:
            idx += self.num_samples
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} samples")
        sample = self.shuffle_index[idx]
        if self._mask_tokens is None:
            return {"tokens": self.window(sample)}
        return {"tokens": self.window(sample), "loss_mask": self.loss_mask_window(sample)}


def _blend_indices(weights: Sequence[float], num_samples: int) -> Dict[str, np.ndarray]:
    """Interleave datasets so every prefix of the blend follows the weights to within one sample.

    The j-th sample drawn from dataset k is given the ideal time (j + 0.5) / w_k; sorting all such times
    gives the order (a vectorised version of Megatron's greedy largest-error choice).
    """
    times, sources, ranks = [], [], []
    for k, (w, count) in enumerate(zip(weights, blend_sample_counts(weights, num_samples))):
        if w <= 0:
            continue
        j = np.arange(count, dtype=np.int64)
        times.append((j + 0.5) / w)
        sources.append(np.full(count, k, dtype=np.int16))
        ranks.append(j)
    order = np.argsort(np.concatenate(times), kind="stable")[:num_samples]
    return {
        "dataset_index": np.concatenate(sources)[order],
        "dataset_sample_index": np.concatenate(ranks)[order],
    }


def blend_sample_counts(weights: Sequence[float], num_samples: int) -> List[int]:
    """Samples each dataset must provide for a blend of ``num_samples`` (enough for the interleaving).

    Among the first N interleaved samples dataset k contributes at most w_k * (N + K/2) + 1/2 (K
    datasets), so ``ceil(w_k * (N + K)) + 1`` always suffices.
    """
    k = len(weights)
    return [int(math.ceil(w * (num_samples + k))) + 1 if w > 0 else 0 for w in weights]


class BlendedDataset:
    """Weighted mixture of datasets (Megatron ``--data-path 0.7 a 0.3 b``), deterministic and cached.

    Item ``i`` is item ``dataset_sample_index[i]`` of dataset ``dataset_index[i]``, so the items keep
    the component datasets' format; when some components have loss masks (answer-masked data) and others
    not, the others' items get an all-ones ``loss_mask`` (every target counts), so every item of the blend
    has the same keys (``has_loss_mask``).
    """

    def __init__(
        self,
        datasets: Sequence[GPTDataset],
        weights: Sequence[float],
        num_samples: int,
        cache_dir: Optional[str] = None,
        name: str = "blend",
    ):
        total = float(sum(weights))
        self.datasets = list(datasets)
        self.weights = [w / total for w in weights]
        self.num_samples = num_samples
        self.description = {
            "class": "BlendedDataset",
            "datasets": [description_hash(d.description) for d in self.datasets],
            "weights": self.weights,
            "num_samples": num_samples,
        }
        cache_dir = cache_dir or default_cache_dir(self.datasets[0].indexed.prefix)
        arrays, self.cache_built, self.cache_base = load_or_build(
            cache_dir, name, self.description, lambda: _blend_indices(self.weights, num_samples)
        )
        self._attach(arrays)
        self.has_loss_mask = any(getattr(ds, "has_loss_mask", False) for ds in self.datasets)
        for k, ds in enumerate(self.datasets):
            used = self.dataset_sample_index[self.dataset_index == k]
            if used.size and int(used.max()) >= len(ds):
                raise DataError(
                    f"{ds.indexed.prefix}: the blend needs {int(used.max()) + 1} samples from this "
                    f"dataset but it was built with {len(ds)}."
                )

    def _attach(self, arrays: Dict[str, np.ndarray]) -> None:
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("dataset_index", "dataset_sample_index")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._attach(load_arrays(self.cache_base))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> Dict[str, np.ndarray]:
        if idx < 0:
            idx += self.num_samples
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} samples")
        item = self.datasets[self.dataset_index[idx]][int(self.dataset_sample_index[idx])]
        if self.has_loss_mask and "loss_mask" not in item:
            item["loss_mask"] = np.ones(len(item["tokens"]) - 1, np.float32)
        return item


def build_train_valid_test_datasets(
    data_path: Sequence[str],
    split: str,
    seq_length: int,
    seed: int,
    num_samples: Sequence[Optional[int]] = (None, None, None),
    cache_dir: Optional[str] = None,
):
    """Return ``(train, valid, test)`` datasets (GPTDataset, BlendedDataset, or None when empty).

    Args:
        data_path: one prefix or Megatron weight/prefix pairs, e.g. ``["0.7", "a", "0.3", "b"]``.
        split: train/valid/test proportions by document, e.g. ``"969,30,1"``.
        seq_length: tokens per sample fed to the model (items hold ``seq_length + 1``).
        seed: shuffling seed (same seed, same data, same order on every rank).
        num_samples: samples wanted per split; None means one epoch of that split, 0 means no dataset.
            For training pass ``train_iters * global_batch_size``.
        cache_dir: folder for cached indices; None puts them in ``index_cache/`` beside each dataset.

    Every rank may call this at once: one process builds each index while the others wait for it.
    A split that gets no documents returns None (an error if samples were explicitly requested).
    """
    weighted = parse_data_path(data_path)
    indexed = [IndexedDataset(prefix) for _, prefix in weighted]
    results = []
    for s, split_name in enumerate(SPLIT_NAMES):
        wanted = num_samples[s]
        if wanted == 0:
            results.append(None)
            continue
        parts, weights = [], []
        for (w, prefix), ds in zip(weighted, indexed):
            start, end = split_document_ranges(ds.num_documents, split)[s]
            if end <= start:
                if wanted is not None:
                    raise DataError(
                        f"{prefix}: split {split!r} gives the {split_name} set no documents out of "
                        f"{ds.num_documents}, but {wanted} {split_name} samples were requested."
                    )
                continue
            parts.append((w, ds, (start, end)))
        if not parts:
            results.append(None)
            continue
        if len(weighted) == 1:
            _, ds, rng = parts[0]
            results.append(GPTDataset(ds, split_name, rng, seq_length, seed, wanted, cache_dir))
            continue
        weights = [w for w, _, _ in parts]
        weights = [w / sum(weights) for w in weights]
        if wanted is None:
            # One epoch of each component, then as many blended samples as the scarcest one allows.
            datasets = [GPTDataset(ds, split_name, rng, seq_length, seed, None, cache_dir) for _, ds, rng in parts]
            k = len(datasets)
            wanted = max(0, min(int((len(d) - 1) / w) for d, w in zip(datasets, weights)) - k)
        else:
            counts = blend_sample_counts(weights, wanted)
            datasets = [
                GPTDataset(ds, split_name, rng, seq_length, seed, n, cache_dir)
                for (_, ds, rng), n in zip(parts, counts)
            ]
        results.append(BlendedDataset(datasets, weights, wanted, cache_dir, name=f"blend-{split_name}"))
    return tuple(results)


# ---------------------------------------------------------------------------------------------------
# Named evaluation sets (--valid-data-path / --test-data-path)

_EVAL_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_DOCUMENT_SUFFIX = "_text_document"


def eval_set_name(prefix: str) -> str:
    """Default name of an evaluation set: the file name, without Megatron's ``_text_document``."""
    base = os.path.basename(prefix.rstrip("/"))
    return base[: -len(_DOCUMENT_SUFFIX)] if base.endswith(_DOCUMENT_SUFFIX) and base != _DOCUMENT_SUFFIX else base


def parse_named_data_paths(entries: Sequence[str], field: str = "data.valid_data_path") -> List[Tuple[str, str]]:
    """``["kjv=data/c/kjv_text_document", "data/c/sotu_text_document"]`` -> ``[("kjv", ...), ("sotu", ...)]``.

    Each entry is one evaluation set, used whole: ``NAME=PREFIX``, or ``PREFIX`` alone, named after the
    file without ``_text_document``. Names (letters, digits, ``_ . -``) label logs and TensorBoard tags
    (``valid/NAME/loss``) and must be unique. The first ``=`` ends the name, so a prefix that contains
    ``=`` needs an explicit name. Entries may also come as one whitespace-separated string.

    Raises:
        DataError: an empty name or prefix, a weight (blends are not evaluation sets), or a repeated name,
            in one sentence naming ``field``.
    """
    items = [tok for entry in entries for tok in str(entry).split()]
    out: List[Tuple[str, str]] = []
    for item in items:
        name, sep, prefix = item.partition("=")
        if not sep:
            name, prefix = eval_set_name(item), item
        elif not _EVAL_NAME.fullmatch(name):
            raise DataError(
                f"{field} entry {item!r}: the name before '=' must be letters, digits, '_', '.' or '-' "
                "(write NAME=PREFIX, or just PREFIX)."
            )
        if not prefix:
            raise DataError(f"{field} entry {item!r}: no dataset prefix after '='.")
        if _is_number(item):
            raise DataError(f"{field} entry {item!r}: weights are not used here; each entry is one evaluation set "
                            "(NAME=PREFIX or PREFIX).")
        if not _EVAL_NAME.fullmatch(name):
            raise DataError(f"{field} entry {item!r}: cannot make a name from the file name; write NAME={prefix}.")
        if any(name == n for n, _ in out):
            raise DataError(f"{field}: the name {name!r} is used twice; give each set its own NAME=PREFIX.")
        out.append((name, prefix))
    return out


def build_named_eval_datasets(
    named_prefixes: Sequence[Tuple[str, str]],
    seq_length: int,
    seed: int,
    num_samples: Optional[int] = None,
    cache_dir: Optional[str] = None,
    split_name: str = "valid",
) -> "collections.OrderedDict[str, GPTDataset]":
    """``name -> GPTDataset`` over the whole of each dataset, in the given order.

    Args:
        named_prefixes: from :func:`parse_named_data_paths`.
        seq_length, seed, cache_dir: as for :func:`build_train_valid_test_datasets`.
        num_samples: samples per set (repeating a small set); None means one epoch of each.
        split_name: ``"valid"`` or ``"test"``; with the name it labels the cached index files.
    """
    out = collections.OrderedDict()
    for name, prefix in named_prefixes:
        ds = IndexedDataset(prefix)
        out[name] = GPTDataset(ds, f"{split_name}-{name}", (0, ds.num_documents), seq_length, seed,
                               num_samples, cache_dir)
    return out
