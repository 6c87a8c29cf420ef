"""Index arithmetic of Megatron-Core's GPT and blended datasets, in numpy.

Each function reproduces the corresponding Megatron-Core routine exactly (same random draws,
same arrays, same dtypes): ``_build_document_index`` / ``_build_shuffle_index`` of
``gpt_dataset.py``, ``build_sample_idx`` and ``build_blending_indices`` of ``helpers.cpp``, and
the split / blend parsing of ``blended_megatron_dataset_config.py`` and ``utils.py``.
The C++ sample-index loop is replaced by a vectorised equivalent (see
:func:`build_sample_index`).
"""
from __future__ import annotations

import math
import re
from typing import Optional

import numpy as np

SPLIT_NAMES = ("train", "valid", "test")


def normalize(weights) -> list[float]:
    """Weights divided by their sum (float64, as Megatron's ``normalize``)."""
    w = np.array(weights, dtype=np.float64)
    total = w.sum()
    if not total > 0:
        raise ValueError(f"weights must have a positive sum, got {list(weights)}")
    return (w / total).tolist()


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` -> normalised [train, valid, test] fractions (missing entries are 0)."""
    values = [float(x) for x in re.findall(r"[.0-9]+", split)]
    if not values or len(values) > 3:
        raise ValueError(f"--split: expected up to three comma-separated weights, got {split!r}")
    values += [0.0] * (3 - len(values))
    return normalize(values)


def split_matrix(fractions: list[float]) -> list[Optional[tuple[float, float]]]:
    """Book-ends ``(begin, end)`` of each split in [0, 1]; None for an empty split.

    Same float accumulation as Megatron's ``convert_split_vector_to_split_matrix``.
    """
    ends = [0.0]
    for f in fractions:
        ends.append(ends[-1] + f)
    out = []
    for beg, end in zip(ends[:-1], ends[1:]):
        out.append(None if end <= beg else (beg, end))
    return out


def split_indices(matrix, num_elements: int) -> list[Optional[np.ndarray]]:
    """Document (sequence) indices of each split: ``arange(round(b*n), round(e*n))``, int32."""
    out = []
    for bookend in matrix:
        if bookend is None:
            out.append(None)
            continue
        beg = int(round(bookend[0] * float(num_elements)))
        end = int(round(bookend[1] * float(num_elements)))
        out.append(np.arange(beg, end, 1, dtype=np.int32))
    return out


def parse_blend(data_path: list[str]) -> tuple[list[str], Optional[list[float]]]:
    """``--data-path`` list -> (prefixes, weights or None), as Megatron's get_blend_from_list.

    An even-length list whose every other entry parses as a float is ``w1 p1 w2 p2 ...``;
    anything else is a plain list of prefixes.
    """
    if not data_path:
        raise ValueError("--data-path is empty")
    if len(data_path) % 2 == 0:
        try:
            weights = [float(w) for w in data_path[0::2]]
        except ValueError:
            weights = None
        if weights is not None:
            if any(w < 0 for w in weights):
                raise ValueError(f"--data-path: negative weight in {data_path}")
            return [p.strip() for p in data_path[1::2]], weights
    return [p.strip() for p in data_path], None


def sizes_per_dataset(weights: list[float], num_samples: int, surplus: float = 0.0) -> list[int]:
    """Samples to draw from each blended dataset: ``ceil(ceil(n * w) * (1 + surplus))``.

    Megatron-Core builds each mid-level dataset with ``surplus=0.005`` and the blend itself with
    ``sum`` of the surplus-free sizes.
    """
    return [int(math.ceil(math.ceil(num_samples * w) * (1 + surplus))) for w in weights]


def num_epochs_needed(tokens_per_epoch: int, num_samples: Optional[int], seq_length: int,
                      add_extra_token: int = 1) -> int:
    """Smallest epoch count whose tokens cover ``num_samples * seq_length + add_extra_token``."""
    if num_samples is None:
        return 1
    requested = num_samples * seq_length + add_extra_token
    return max(1, -(-requested // tokens_per_epoch))


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    """Documents repeated ``num_epochs`` times and shuffled (int32); the last epoch shuffled on
    its own when ``separate_final_epoch``."""
    if not separate_final_epoch or num_epochs == 1:
        doc_index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
        rng.shuffle(doc_index)
        return doc_index
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_shuffle_index(num_samples: int, total_size: int,
                        rng: np.random.RandomState) -> np.ndarray:
    """Shuffled ``[0, num_samples)`` followed by shuffled ``[num_samples, total_size)``."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(0, num_samples, 1, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, 1, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int,
                       num_epochs: int, tokens_per_epoch: int,
                       drop_last_partial_sequence: bool = True,
                       add_extra_token: int = 1) -> np.ndarray:
    """``[num_samples + 1, 2]`` array of (position in document_index, token offset) per sample.

    Vectorised equivalent of helpers.cpp ``build_sample_idx``. The documents, in
    ``document_index`` order, form one token stream; sample ``i`` starts at stream position
    ``p = i * seq_length`` (consecutive samples share one token when ``add_extra_token``).
    The C++ loop stops inside the first document whose cumulative end reaches
    ``p + add_extra_token``, so the entry is that document and ``p`` minus its start; this is
    a ``searchsorted`` over the cumulative document ends. Entry 0 is always (0, 0), and an
    entry past the end of the stream (only without ``drop_last_partial_sequence``) is the last
    document at ``size - add_extra_token``, both as in the C++.
    """
    if seq_length <= 1 or num_epochs <= 0 or tokens_per_epoch <= 1:
        raise ValueError(f"bad sample index arguments: seq_length={seq_length}, "
                         f"num_epochs={num_epochs}, tokens_per_epoch={tokens_per_epoch}")
    total = num_epochs * tokens_per_epoch
    if drop_last_partial_sequence:
        num_samples = (total - add_extra_token) // seq_length
    else:
        # The C++ computes this in single precision: ceil(float(total - extra) / seq_length).
        num_samples = int(np.ceil(np.float32(total - add_extra_token) / np.float32(seq_length)))
    doc_sizes = np.asarray(sizes)[document_index].astype(np.int64)
    ends = np.cumsum(doc_sizes)
    if ends[-1] != total:
        raise ValueError(f"document sizes sum to {ends[-1]}, expected {total} tokens")
    positions = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    docs = np.searchsorted(ends, positions + add_extra_token, side="left")
    past_end = docs >= len(ends)
    docs = np.minimum(docs, len(ends) - 1)
    offsets = positions - (ends[docs] - doc_sizes[docs])
    offsets[past_end] = doc_sizes[-1] - add_extra_token
    largest = max(len(document_index), int(np.max(sizes)))
    dtype = np.int32 if largest <= np.iinfo(np.int32).max else np.int64
    out = np.empty((num_samples + 1, 2), dtype=dtype)
    out[0] = 0
    out[1:, 0] = docs
    out[1:, 1] = offsets
    return out


def build_blending_indices(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16, dataset_sample_index int64) of helpers.cpp build_blending_indices.

    Greedy: sample ``i`` goes to the dataset whose share lags its weight the most,
    ``argmax_j(w_j * max(i, 1) - count_j)`` (lowest j on ties). The argmax depends on every
    previous choice, so this is a sequential loop, written with Python floats (IEEE doubles,
    the same arithmetic as the C++); about 1 s per million samples for a few datasets.
    """
    w = [float(x) for x in weights]
    k = len(w)
    if k >= 32767:
        raise ValueError("at most 32766 datasets can be blended (int16 dataset index)")
    choice = np.zeros(size, dtype=np.int16)
    if k == 1 or size == 0:
        return choice, np.arange(size, dtype=np.int64)
    counts = [0] * k
    rk = range(1, k)
    out = [0] * size
    for i in range(size):
        x = float(i) if i > 1 else 1.0
        best = 0
        best_err = w[0] * x - counts[0]
        for j in rk:
            err = w[j] * x - counts[j]
            if err > best_err:
                best_err = err
                best = j
        out[i] = best
        counts[best] += 1
    choice[:] = out
    # The sample index is each dataset's running count: rank of the sample among the samples
    # of its dataset, from a stable sort by dataset.
    order = np.argsort(choice, kind="stable")
    starts = np.concatenate(([0], np.cumsum(np.bincount(choice, minlength=k))[:-1]))
    sample_index = np.empty(size, dtype=np.int64)
    sample_index[order] = np.arange(size, dtype=np.int64) - starts[choice[order]]
    return choice, sample_index
