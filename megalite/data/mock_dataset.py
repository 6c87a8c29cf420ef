"""Deterministic synthetic GPT samples (``--mock-data``)."""
from __future__ import annotations

import numpy as np


class MockGPTDataset:
    """``num_samples`` samples of ``seq_length + 1`` int64 tokens in ``[0, vocab_size)``.

    Sample ``i`` depends only on ``(seed, i)``, so every rank reading it gets the same tokens.
    Each sample is an arithmetic progression modulo ``vocab_size`` with a random start and a
    random stride in ``[1, 8]``: cheap to generate and learnable, so the loss falls on it.
    """

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 1234):
        if num_samples < 0 or seq_length < 1 or vocab_size < 2:
            raise ValueError(f"bad mock dataset: num_samples={num_samples}, "
                             f"seq_length={seq_length}, vocab_size={vocab_size}")
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> np.ndarray:
        """Sample ``idx``: int64 array of ``seq_length + 1`` tokens."""
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range ({self.num_samples} samples)")
        rng = np.random.default_rng([self.seed, int(idx)])
        start = int(rng.integers(0, self.vocab_size))
        stride = int(rng.integers(1, 9))
        steps = np.arange(self.seq_length + 1, dtype=np.int64)
        return (start + stride * steps) % self.vocab_size
