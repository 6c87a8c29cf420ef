"""Data with end-of-document tokens for the packed-document tests (``--mock-data`` has none).

:func:`write_packed_corpus` writes a small Megatron ``.bin/.idx`` of many short documents, each
followed by the EOD of ``NullTokenizer --vocab-size 100`` (id 100), through megalite's own
builder, as ``tools/preprocess_data.py --append-eod`` would. Documents are 1 to 11 tokens (+ EOD)
long, so a 16-token sample of ``TINY`` packs two to five of them, cut at both ends; each is an
arithmetic progression (random start and stride), so the loss can fall.
:func:`packed_argv` turns the harness's ``TINY`` into a run on that file.
"""
from __future__ import annotations

import os

import numpy as np

from equivalence import TINY

VOCAB = 100          # NullTokenizer --vocab-size 100: ids 0..99 and the EOD 100
EOD = VOCAB
PACKED = ("--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss")


def documents(count: int = 400, seed: int = 0) -> list[np.ndarray]:
    """``count`` documents (each ending with the EOD) of 2 to 12 tokens."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        n = int(rng.integers(1, 12))
        body = (int(rng.integers(0, VOCAB)) + int(rng.integers(1, 6)) * np.arange(n)) % VOCAB
        docs.append(np.append(body, EOD).astype(np.int64))
    return docs


def write_packed_corpus(directory: str, count: int = 400) -> str:
    """Write the documents to ``directory/packed_text_document.{bin,idx}``; returns the prefix."""
    from megalite.data.indexed_dataset import IndexedDatasetBuilder, optimal_dtype

    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, "packed_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=optimal_dtype(VOCAB + 1))
    for doc in documents(count):
        builder.add_document(doc, [doc.size])
    builder.finalize(prefix + ".idx")
    return prefix


def packed_argv(prefix: str, cache_dir: str, base=TINY) -> list[str]:
    """``base`` (the harness's TINY) reading ``prefix`` with NullTokenizer instead of --mock-data."""
    argv = [a for a in base if a != "--mock-data"]
    return argv + ["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--split", "100,0,0",
                   "--data-cache-path", cache_dir]
