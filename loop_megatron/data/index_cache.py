"""Build-once, reuse-many cache of numpy index arrays, safe under concurrent ranks and nodes.

A cache entry is a set of ``.npy`` files plus a ``.json`` description, all named by a hash of the
description (everything the arrays depend on). The description is written last, after every array
has been renamed into place, so its presence means the entry is complete: readers never see a
half-written cache. When it is missing, processes take an exclusive flock; the first one builds while
the others wait, then find the description and load what it wrote.
"""

import hashlib
import json
import os
from typing import Callable, Dict, Tuple

import numpy as np

from ..utils.fs import atomic_open, exclusive_lock, write_json
from .errors import DataError

# Bump when the meaning of cached arrays changes, so old caches are not reused.
CACHE_FORMAT = 1


def description_hash(description: dict) -> str:
    """Short stable hash of a JSON-serialisable description."""
    blob = json.dumps({"format": CACHE_FORMAT, **description}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(path: str) -> Dict[str, int]:
    """Size and mtime of ``path``: a rewritten data file invalidates caches built from it."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _load(base: str, keys) -> Dict[str, np.ndarray]:
    # mmap keeps startup fast and memory shared between ranks on one node; np.asarray drops the
    # np.memmap subclass, whose per-item indexing is several times slower than a plain ndarray's.
    return {k: np.asarray(np.load(f"{base}-{k}.npy", mmap_mode="r")) for k in keys}


def load_or_build(
    cache_dir: str,
    name: str,
    description: dict,
    build: Callable[[], Dict[str, np.ndarray]],
) -> Tuple[Dict[str, np.ndarray], bool, str]:
    """Return ``(arrays, built, base_path)``: the cached arrays, and whether this call built them.

    Args:
        cache_dir: folder for the cache files (created if needed).
        name: readable file-name stem, e.g. ``"sotu_text_document-train"``.
        description: everything the arrays depend on; its hash names the files.
        build: function computing the arrays; called at most once across concurrent processes.
    """
    base = os.path.join(cache_dir, f"{name}-{description_hash(description)}")
    desc_path = base + "-description.json"

    def try_load():
        if not os.path.exists(desc_path):
            return None
        with open(desc_path) as f:
            keys = json.load(f)["arrays"]
        return _load(base, keys)

    arrays = try_load()  # a complete cache is only read, so it may live in a read-only folder
    if arrays is not None:
        return arrays, False, base
    try:
        os.makedirs(cache_dir, exist_ok=True)
        writable = os.access(cache_dir, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        raise DataError(
            f"{cache_dir}: cannot write the dataset index cache there; point the cache path "
            "(data_cache_path) at a writable folder."
        )
    with exclusive_lock(base + ".lock"):
        arrays = try_load()  # another process may have built it while we waited for the lock
        if arrays is not None:
            return arrays, False, base
        built = build()
        for key, arr in built.items():
            with atomic_open(f"{base}-{key}.npy", "wb") as f:  # a file object stops np.save appending ".npy"
                np.save(f, arr, allow_pickle=False)
        write_json(desc_path, {"arrays": sorted(built), "description": description}, indent=1)
    return _load(base, sorted(built)), True, base


def load_arrays(base: str) -> Dict[str, np.ndarray]:
    """Reload the arrays of a complete cache entry from its ``base`` path (as returned above)."""
    with open(base + "-description.json") as f:
        return _load(base, json.load(f)["arrays"])
