"""Data-parallel batch sampler (Megatron's MegatronPretrainingSampler)."""
from __future__ import annotations

from typing import Iterator


class MegatronPretrainingSampler:
    """Yields this rank's micro batches of dataset indices, resuming at ``consumed_samples``.

    The global order is ``consumed_samples, consumed_samples + 1, ...``, cut into consecutive
    blocks of ``micro_batch_size * data_parallel_size``; data-parallel rank ``r`` takes the
    slice ``[r * micro_batch_size, (r + 1) * micro_batch_size)`` of each block. A trailing
    partial block is dropped unless ``drop_last`` is False. Resuming with the samples consumed
    so far continues exactly where an uninterrupted run would be (block-aligned, as the
    trainer consumes whole global batches). Use it as a DataLoader ``batch_sampler``.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True):
        if total_samples <= 0:
            raise ValueError(f"no sample to consume: total_samples={total_samples}")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(f"no samples left to consume: consumed_samples={consumed_samples}, "
                             f"total_samples={total_samples}")
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) and data_parallel_size "
                             f"({data_parallel_size}) must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} must be in "
                             f"[0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        # Megatron returns the total sample count here (not the number of batches).
        return self.total_samples

    def get_start_end_idx(self) -> tuple[int, int]:
        """This rank's slice of a global micro-batch block."""
        start = self.data_parallel_rank * self.micro_batch_size
        return start, start + self.micro_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        start, end = self.get_start_end_idx()
        block = self.micro_batch_times_data_parallel_size
        first = self.consumed_samples
        full_blocks = (self.total_samples - first) // block
        for b in range(full_blocks):
            base = first + b * block
            yield list(range(base + start, base + end))
        rest = first + full_blocks * block
        if rest < self.total_samples and not self.drop_last:
            batch = list(range(rest, self.total_samples))
            yield batch[start:end]
