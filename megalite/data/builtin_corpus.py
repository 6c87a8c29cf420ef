"""Built-in training corpus: the Python standard library's own sources, byte-tokenized.

Used when training gets no data flag. Every ``.py`` file of the interpreter's stdlib (sorted
paths; tests, site-packages and caches skipped; capped in total size) is one document, tokenized
with :class:`~megalite.data.tokenizers.ByteTokenizer` plus an EOD token, and written once into a
cached ``.bin/.idx`` pair (docs/data.md) that later runs reuse.
"""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import time
from typing import Optional

import numpy as np

from megalite.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, exists
from megalite.data.tokenizers import ByteTokenizer

DEFAULT_MAX_BYTES = 8_000_000
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_FORMAT = "megalite-stdlib-1"


def default_cache_dir() -> str:
    """``~/.cache/megalite``."""
    return os.path.join(os.path.expanduser("~"), ".cache", "megalite")


def stdlib_files(max_bytes: int = DEFAULT_MAX_BYTES) -> list[tuple[str, int]]:
    """(path, size) of the stdlib ``.py`` files used, sorted, within ``max_bytes`` in total.

    Files are taken in sorted order and one that would pass the cap is left out, so the list
    is deterministic for a given interpreter.
    """
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            if name.endswith(".py") and not name.startswith("test_"):
                found.append(os.path.join(dirpath, name))
    chosen, total = [], 0
    for path in sorted(found):
        size = os.path.getsize(path)
        if 0 < size and total + size <= max_bytes:
            chosen.append((path, size))
            total += size
    return chosen


def builtin_corpus_prefix(cache_dir: Optional[str] = None, log=print,
                          max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Prefix of the built-in corpus' ``.bin/.idx``, building it on first use.

    Files live in ``cache_dir`` (default ``~/.cache/megalite``) under a name that encodes the
    interpreter version and a hash of the file list and sizes, so a different Python or cap
    builds its own. Building takes a few seconds; the pair is written under temporary names
    and renamed, so concurrent callers are safe and a crash leaves nothing half-written.
    """
    cache_dir = cache_dir or default_cache_dir()
    files = stdlib_files(max_bytes)
    if not files:
        raise RuntimeError(f"no Python sources found under {sysconfig.get_paths()['stdlib']}")
    h = hashlib.md5(_FORMAT.encode())
    for path, size in files:
        h.update(f"{os.path.relpath(path, sysconfig.get_paths()['stdlib'])}:{size}\n".encode())
    version = f"py{sys.version_info[0]}.{sys.version_info[1]}"
    prefix = os.path.join(cache_dir, f"stdlib_{version}_{h.hexdigest()[:10]}_text_document")
    if exists(prefix):
        log(f"> built-in corpus: reusing {prefix}.bin/.idx")
        return prefix

    t0 = time.time()
    log(f"> built-in corpus: building {prefix}.bin/.idx from {len(files)} stdlib files "
        f"({sum(s for _, s in files) / 1e6:.1f} MB) ...")
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{prefix}.tmp-{os.getpid()}"
    tok = ByteTokenizer()
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=np.uint16)
    n_docs = 0
    try:
        for path, _ in files:
            with open(path, "rb") as f:
                raw = f.read()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                continue  # a few legacy sources are not UTF-8 text; leave them out
            ids = np.frombuffer(raw, dtype=np.uint8).astype(np.uint16)
            builder.add_item(np.append(ids, np.uint16(tok.eod)))
            builder.end_document()
            n_docs += 1
    except BaseException:
        builder.abort()
        raise
    try:
        builder.finalize(tmp + ".idx")
        # .bin first: exists() requires both, and the .idx rename completes the pair.
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
    finally:
        for suffix in (".bin", ".idx"):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
    n_tokens = int(IndexedDataset(prefix).sequence_lengths.sum(dtype=np.int64))
    log(f"> built-in corpus: {n_docs} documents, {n_tokens} tokens in {time.time() - t0:.1f} s")
    return prefix
