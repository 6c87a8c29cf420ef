"""Weighted blend of several datasets (Megatron-Core's BlendedDataset)."""
from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np

from megalite.data import cache
from megalite.data.index_builders import build_blending_indices, normalize


class BlendedDataset:
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``.

    Sample ``i`` is ``datasets[dataset_index[i]][dataset_sample_index[i]]``, where the two
    indices come from Megatron's greedy error-minimising interleave, so every prefix of the
    blend follows the weights as closely as possible. Indices are cached in ``cache_dir``
    (atomically) when given, else recomputed (deterministically) on every rank.
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int,
                 cache_dir: Optional[str], log=print):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.weights = normalize(weights)
        self.size = int(size)
        fields = {
            "class": "BlendedDataset",
            "format": "megalite-1",
            "datasets": [getattr(d, "description_hash", repr(d)) for d in self.datasets],
            "weights": self.weights,
            "size": self.size,
        }
        self.description, self.description_hash = cache.describe(fields)
        base = f"{self.description_hash}-BlendedDataset"
        names = ("dataset_index", "dataset_sample_index")
        cached = cache.load(cache_dir, base, names, self.description, log)
        if cached is not None:
            self.dataset_index = cached["dataset_index"]
            self.dataset_sample_index = cached["dataset_sample_index"]
            log(f"> loaded BlendedDataset indices ({self.size} samples) from {cache_dir}")
        else:
            t0 = time.time()
            self.dataset_index, self.dataset_sample_index = build_blending_indices(
                self.weights, self.size)
            if cache_dir:
                cache.save(cache_dir, base, {"dataset_index": self.dataset_index,
                                             "dataset_sample_index": self.dataset_sample_index},
                           self.description)
            log(f"> built BlendedDataset indices ({self.size} samples from "
                f"{len(self.datasets)} datasets) in {time.time() - t0:.2f} s")
        self._check_sizes()

    def _check_sizes(self) -> None:
        counts = np.bincount(np.asarray(self.dataset_index, dtype=np.int64),
                             minlength=len(self.datasets))
        for j, (count, d) in enumerate(zip(counts, self.datasets)):
            if count > len(d):
                raise ValueError(f"blend draws {count} samples from dataset {j} which has only "
                                 f"{len(d)}; its sample count is too small for its weight")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> np.ndarray:
        """Sample ``idx`` of the blend (whatever the component datasets return)."""
        if not -self.size <= idx < self.size:
            raise IndexError(f"sample {idx} out of range ({self.size} samples)")
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]
