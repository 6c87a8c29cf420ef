"""GPT pretraining datasets: Megatron-Core's GPTDataset indices, splits, blends and caching.

``build_train_valid_test_datasets`` is the trainer's entry point. A sample is an int64 numpy
array of ``seq_length + 1`` tokens (the trainer shifts it for the labels). Sample ``i`` of a
split is the same as Megatron-Core's for the same files, split, seq_length, seed and sample
counts: the document, sample and shuffle indices follow the same algorithm and random draws
(see :mod:`megalite.data.index_builders`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megalite.data import cache, index_builders as ib
from megalite.data.blended_dataset import BlendedDataset
from megalite.data.indexed_dataset import IndexedDataset, idx_path
from megalite.data.sft import build_sft_splits, is_sft_dataset

# Megatron-Core's mid_level_dataset_surplus: each blended component builds 0.5% extra samples.
MID_LEVEL_DATASET_SURPLUS = 0.005
# Below this fraction of an epoch, the final epoch is shuffled separately (Megatron's rule).
_SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


def train_valid_test_num_samples(train_iters: int, global_batch_size: int,
                                 eval_interval: Optional[int], eval_iters: int
                                 ) -> tuple[int, int, int]:
    """Samples each split must provide, as Megatron computes them.

    train: ``train_iters * gbs``; valid: ``(train_iters // eval_interval + 1) * eval_iters * gbs``
    (every evaluation during training plus the final one); test: ``eval_iters * gbs``.
    Without an eval interval (None or 0) no validation samples are needed.
    """
    train = train_iters * global_batch_size
    valid = (train_iters // eval_interval + 1) * eval_iters * global_batch_size if eval_interval else 0
    return train, valid, eval_iters * global_batch_size


@dataclass(frozen=True)
class GPTDatasetConfig:
    """Settings shared by the splits; every field is part of the index cache key."""

    seq_length: int
    seed: int
    split: str
    split_matrix: tuple
    cache_dir: Optional[str] = None
    tokenizer_eod: Optional[int] = None
    add_extra_token: int = 1


class GPTDataset:
    """Fixed-length samples cut from the documents ``indices`` of an :class:`IndexedDataset`.

    Documents are repeated for as many epochs as ``num_samples`` needs and shuffled per epoch
    (document index); the token stream is cut every ``seq_length`` tokens (sample index); the
    samples are shuffled (shuffle index). Indices are cached under ``config.cache_dir`` (or,
    as Megatron, ``{prefix}/cache/GPTDataset_indices`` when None). ``num_samples=None`` means
    exactly one epoch.
    """

    def __init__(self, indexed: IndexedDataset, dataset_path: str, indices: np.ndarray,
                 num_samples: Optional[int], split_name: str, config: GPTDatasetConfig,
                 log=print):
        self.dataset = indexed
        self.dataset_path = dataset_path
        self.indices = indices
        self.num_samples = num_samples
        self.split_name = split_name
        self.config = config
        self.seq_length = config.seq_length
        self.description, self.description_hash = cache.describe(self._identifiers())
        self.cache_dir = config.cache_dir or os.path.join(dataset_path, "cache",
                                                          "GPTDataset_indices")
        self.document_index, self.sample_index, self.shuffle_index = self._indices(log)

    def _identifiers(self) -> dict:
        ds, c = self.dataset, self.config
        return {
            "class": "GPTDataset",
            "format": "megalite-1",
            "dataset_path": os.path.abspath(self.dataset_path),
            # Identify the data itself too, so re-preprocessed files never reuse stale indices.
            "dataset": {"sequences": len(ds), "documents": ds.num_documents,
                        "idx_bytes": os.path.getsize(idx_path(self.dataset_path)),
                        "dtype": str(ds.dtype)},
            "num_samples": self.num_samples,
            "index_split": self.split_name,
            "split_range": [int(self.indices[0]) if len(self.indices) else 0,
                            int(self.indices[-1]) + 1 if len(self.indices) else 0],
            "random_seed": c.seed,
            "sequence_length": c.seq_length,
            "split": c.split,
            "split_matrix": [list(b) if b else None for b in c.split_matrix],
            "add_extra_token_to_sequence": c.add_extra_token,
            "tokenizer_eod": c.tokenizer_eod,
        }

    def _indices(self, log):
        base = f"{self.description_hash}-GPTDataset-{self.split_name}"
        names = ("document_index", "sample_index", "shuffle_index")
        cached = cache.load(self.cache_dir, base, names, self.description, log)
        if cached is not None:
            log(f"> loaded GPTDataset {self.split_name} indices for {self.dataset_path} "
                f"({cached['sample_index'].shape[0] - 1} samples) from {self.cache_dir}")
            return tuple(cached[n] for n in names)
        t0 = time.time()
        arrays = self._build()
        try:
            cache.save(self.cache_dir, base, dict(zip(names, arrays)), self.description)
            where = f"cached in {self.cache_dir}"
        except OSError as e:
            where = f"not cached: cannot write {self.cache_dir} ({e}); pass --data-cache-path"
        log(f"> built GPTDataset {self.split_name} indices for {self.dataset_path}: "
            f"{arrays[1].shape[0] - 1} samples in {time.time() - t0:.2f} s ({where})")
        return arrays

    def _build(self):
        c, extra = self.config, self.config.add_extra_token
        sizes = self.dataset.sequence_lengths
        tokens_per_epoch = int(np.sum(sizes[self.indices], dtype=np.int64))
        num_epochs = ib.num_epochs_needed(tokens_per_epoch, self.num_samples, c.seq_length, extra)
        separate_final_epoch = False
        if num_epochs > 1:
            # Shuffle the last epoch on its own when only a small part of it is used, so those
            # few samples are not drawn from anywhere in the stream (Megatron's rule).
            without_final = ((num_epochs - 1) * tokens_per_epoch - extra) // c.seq_length
            from_final = self.num_samples - without_final
            per_epoch = (tokens_per_epoch - extra) // c.seq_length
            assert 0 <= from_final <= per_epoch + 1
            separate_final_epoch = from_final < int(_SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch)
        rng = np.random.RandomState(c.seed)
        document_index = ib.build_document_index(self.indices, num_epochs, rng,
                                                 separate_final_epoch)
        sample_index = ib.build_sample_index(sizes, document_index, c.seq_length, num_epochs,
                                             tokens_per_epoch, True, extra)
        num = sample_index.shape[0] - 1
        first = without_final if separate_final_epoch else num
        shuffle_index = ib.build_shuffle_index(first, num, rng)
        return document_index, sample_index, shuffle_index

    def __len__(self) -> int:
        return int(self.sample_index.shape[0]) - 1

    def __getitem__(self, idx: int) -> np.ndarray:
        """Sample ``idx``: int64 array of ``seq_length + 1`` tokens."""
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sample {idx} out of range ({n} samples)")
        i = int(self.shuffle_index[idx])
        d0, o0 = (int(x) for x in self.sample_index[i])
        d1, o1 = (int(x) for x in self.sample_index[i + 1])
        extra, doc = self.config.add_extra_token, self.document_index
        if d0 == d1:
            parts = [self.dataset.get(doc[d0], o0, o1 - o0 + extra)]
        else:
            parts = [self.dataset.get(doc[d0], o0)]
            parts += [self.dataset.get(doc[d]) for d in range(d0 + 1, d1)]
            parts.append(self.dataset.get(doc[d1], 0, o1 + extra))
        return np.concatenate(parts).astype(np.int64)


def _build_splits(prefix: str, matrix, num_samples, config: GPTDatasetConfig, log):
    """The three GPTDatasets (or None) of one prefix; a split with no tokens is None. Packed SFT
    data (a prefix with a loss mask beside it, :mod:`megalite.data.sft`) gives PackedSFTDatasets."""
    if is_sft_dataset(prefix):
        return build_sft_splits(prefix, matrix, num_samples, config.seq_length, config.seed)
    indexed = IndexedDataset(prefix)
    out = []
    for name, indices, n in zip(ib.SPLIT_NAMES, ib.split_indices(matrix, len(indexed)),
                                num_samples):
        if indices is not None and np.sum(indexed.sequence_lengths[indices], dtype=np.int64) < 2:
            if name == "train":
                raise ValueError(f"{prefix}: the train split ({config.split}) holds no tokens "
                                 f"({len(indexed)} documents in all)")
            log(f"> WARNING: {prefix}: the {name} split of --split {config.split} has no "
                f"documents ({len(indexed)} in all); no {name} dataset")
            indices = None
        out.append(None if indices is None else
                   GPTDataset(indexed, prefix, indices, n, name, config, log))
    return out


def build_train_valid_test_datasets(data_path: Optional[list[str]], split: str, seq_length: int,
                                    seed: int, num_samples: tuple[int, int, int],
                                    cache_dir: Optional[str], tokenizer_eod: Optional[int] = None,
                                    log=print):
    """Train / valid / test datasets for ``--data-path``, ``--split`` and the sample counts.

    ``data_path`` is the raw ``--data-path`` list: ``[prefix, ...]`` or
    ``[w1, prefix1, w2, prefix2, ...]``; None uses the built-in corpus. A single unweighted
    prefix gives :class:`GPTDataset` splits; otherwise each prefix is split the same way and
    blended by weight (normalised; each component built with ``ceil(ceil(n * w) * 1.005)``
    samples, the blend ``sum(ceil(n * w))`` long) into a :class:`BlendedDataset`, as
    Megatron-Core. Unweighted lists blend by dataset size. A split whose weight is 0 (or that
    gets no documents) is None. Index caches go to ``cache_dir`` (``--data-cache-path``) and are
    written atomically, so concurrent calls are safe: call on rank 0 first, then the others.
    """
    if data_path is None:
        from megalite.data.builtin_corpus import builtin_corpus_prefix
        data_path = [builtin_corpus_prefix(cache_dir, log=log)]
    prefixes, weights = ib.parse_blend(list(data_path))
    matrix = tuple(ib.split_matrix(ib.parse_split(split)))
    config = GPTDatasetConfig(seq_length=seq_length, seed=seed, split=split,
                              split_matrix=matrix, cache_dir=cache_dir,
                              tokenizer_eod=tokenizer_eod)
    num_samples = tuple(num_samples)
    if len(prefixes) == 1 and weights is None:
        return tuple(_build_splits(prefixes[0], matrix, num_samples, config, log))

    if weights is not None:
        weights = ib.normalize(weights)
        targets = [ib.sizes_per_dataset(weights, n) for n in num_samples]
        buffers = [ib.sizes_per_dataset(weights, n, MID_LEVEL_DATASET_SURPLUS)
                   for n in num_samples]
        per_prefix = [_build_splits(p, matrix, [buffers[s][i] for s in range(3)], config, log)
                      for i, p in enumerate(prefixes)]
    else:
        per_prefix = [_build_splits(p, matrix, (None, None, None), config, log)
                      for p in prefixes]
    result = []
    for s, name in enumerate(ib.SPLIT_NAMES):
        parts = [splits[s] for splits in per_prefix]
        if all(d is None for d in parts):
            result.append(None)
            continue
        if any(d is None for d in parts):
            empty = [p for p, d in zip(prefixes, parts) if d is None]
            raise ValueError(f"--data-path: the {name} split is empty for {empty}")
        if weights is not None:
            blend_weights, size = weights, sum(targets[s])
        else:
            blend_weights = ib.normalize([len(d) for d in parts])
            size = sum(len(d) for d in parts)
            size = size if num_samples[s] is None else min(num_samples[s], size)
        result.append(BlendedDataset(parts, blend_weights, size, cache_dir, log=log))
    return tuple(result)
