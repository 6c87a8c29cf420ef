"""Contiguous gradient (and parameter) buffers split into buckets for data-parallel reduction.

Every parameter the buffer holds (a rank's model chunks; MoE experts in a second buffer) gets
a slice of one flat fp32 gradient buffer (``param.main_grad``) and of one flat parameter
buffer (``param.data`` is re-pointed into it).
Parameters are laid out in reverse order, roughly the order backward produces their grads,
and grouped into buckets of about ``bucket_size`` elements, each padded to a multiple of the
data-parallel size so that it splits into equal per-rank shards.

Backward hooks add each fresh ``param.grad`` into ``main_grad`` and drop it. When every
parameter of a bucket has received its grad of the *last* micro-batch, the bucket is ready;
with ``overlap=True`` its collective starts at once (asynchronously) while backward goes on:
an all-reduce, or with the distributed optimizer a reduce-scatter that leaves each rank the
summed grads of its own shard. :meth:`GradBuffer.finish_grad_sync` launches what is left and
waits for everything.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..tensor_parallel.mappings import all_gather_single, reduce_scatter_single

DEFAULT_BUCKET_SIZE = 40_000_000  # elements, as Megatron-Core


class Bucket:
    """A contiguous range ``[start, end)`` of the buffers and the parameters inside it."""

    def __init__(self, index: int, params: list, start: int, end: int, deferred: bool):
        self.index, self.params, self.start, self.end = index, params, start, end
        self.deferred = deferred  # never launched from a hook (see GradBuffer.__init__)
        self.pending = 0          # grads still expected before the bucket is ready
        self.work = None

    @property
    def numel(self) -> int:
        return self.end - self.start


class GradBuffer:
    """Flat grad/param buffers, buckets and their data-parallel collectives for one rank."""

    def __init__(self, params, dp_group, dp_size: int, bucket_size: int | None = None,
                 overlap: bool = False, reduce_scatter: bool = False, deferred_params=()):
        """``params``: the parameters this buffer holds, in model order (all of a rank's model
        chunks; MoE models keep the expert params in a second buffer, reduced over the
        expert-data-parallel group)."""
        self.dp_group, self.dp_size = dp_group, dp_size
        self.dp_rank = dist.get_rank(dp_group) if dp_size > 1 else 0
        self.overlap, self.reduce_scatter = overlap, reduce_scatter
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("GradBuffer: the model has no trainable parameters")
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1:
            raise ValueError(f"GradBuffer: all parameters must share one dtype, got {sorted(map(str, dtypes))}")
        # Tied embedding copies (PP > 1) must be summed across stages *before* the DP reduction
        # (their buffer positions differ between stages), so they sit in a bucket of their own
        # that finalize_model_grads launches after the embedding all-reduce.
        deferred_ids = {id(p) for p in deferred_params}
        ordered = [p for p in reversed(params) if id(p) not in deferred_ids]
        self.buckets: list[Bucket] = []
        self.param_range: dict[int, tuple[int, int]] = {}  # id(param) -> [start, end) in buffers
        size = bucket_size or DEFAULT_BUCKET_SIZE
        offset, current = 0, []
        for i, p in enumerate(ordered):
            self.param_range[id(p)] = (offset, offset + p.numel())
            offset += p.numel()
            current.append(p)
            if sum(q.numel() for q in current) >= size or i == len(ordered) - 1:
                offset = self._close_bucket(current, offset, deferred=False)
                current = []
        deferred = [p for p in params if id(p) in deferred_ids]
        for p in deferred:
            self.param_range[id(p)] = (offset, offset + p.numel())
            offset += p.numel()
        if deferred:
            offset = self._close_bucket(deferred, offset, deferred=True)
        self.numel = offset
        device = params[0].device
        self.grad_data = torch.zeros(offset, dtype=torch.float32, device=device)
        self.param_data = torch.zeros(offset, dtype=params[0].dtype, device=device)
        self.params = params
        self.bucket_of: dict[int, Bucket] = {}
        for bucket in self.buckets:
            for p in bucket.params:
                self.bucket_of[id(p)] = bucket
        for p in params:
            start, end = self.param_range[id(p)]
            self.param_data[start:end].copy_(p.data.view(-1))
            p.data = self.param_data[start:end].view_as(p)
            p.main_grad = self.grad_data[start:end].view_as(p)
            p.register_post_accumulate_grad_hook(self._grad_hook)
        self.microbatches_left = 1

    def _close_bucket(self, params: list, offset: int, deferred: bool) -> int:
        start = self.param_range[id(params[0])][0]
        end = -(-offset // self.dp_size) * self.dp_size  # pad to a multiple of DP
        self.buckets.append(Bucket(len(self.buckets), list(params), start, end, deferred))
        return end

    # -- per-iteration protocol ------------------------------------------------------------
    def start_grad_sync(self, num_microbatches: int) -> None:
        """Zero the grads and expect ``num_microbatches`` backward passes before reducing."""
        self.grad_data.zero_()
        for bucket in self.buckets:
            bucket.pending = len(bucket.params) * num_microbatches
            bucket.work = None

    def _grad_hook(self, param: torch.Tensor) -> None:
        param.main_grad.add_(param.grad)
        param.grad = None
        bucket = self.bucket_of[id(param)]
        bucket.pending -= 1
        if bucket.pending == 0 and self.overlap and not bucket.deferred:
            self._launch(bucket, async_op=True)

    def _launch(self, bucket: Bucket, async_op: bool) -> None:
        if bucket.work is not None or self.dp_size == 1:
            return
        grads = self.grad_data[bucket.start:bucket.end]
        if self.reduce_scatter:
            bucket.work = reduce_scatter_single(self.shard(bucket, self.grad_data), grads,
                                                group=self.dp_group, async_op=async_op)
        else:
            bucket.work = dist.all_reduce(grads, group=self.dp_group, async_op=async_op)
        bucket.work = bucket.work or True  # synchronous calls return None: mark as done

    def finish_grad_sync(self) -> None:
        """Launch the collectives not yet started and wait for all of them."""
        for bucket in self.buckets:
            self._launch(bucket, async_op=self.overlap)
        for bucket in self.buckets:
            if bucket.work is not None and bucket.work is not True:
                bucket.work.wait()

    # -- distributed-optimizer helpers ---------------------------------------------------
    def shard_range(self, bucket: Bucket, dp_rank: int) -> tuple[int, int]:
        """``[start, end)`` of the buffers that ``dp_rank`` owns within ``bucket``."""
        shard = bucket.numel // self.dp_size
        return bucket.start + dp_rank * shard, bucket.start + (dp_rank + 1) * shard

    def shard(self, bucket: Bucket, data: torch.Tensor, dp_rank: int | None = None) -> torch.Tensor:
        start, end = self.shard_range(bucket, self.dp_rank if dp_rank is None else dp_rank)
        return data[start:end]

    def all_gather_params(self) -> None:
        """After each rank updated its shard of the params: gather all shards, bucket by bucket."""
        if self.dp_size == 1:
            return
        for bucket in self.buckets:
            mine = self.shard(bucket, self.param_data).clone()
            all_gather_single(self.param_data[bucket.start:bucket.end], mine, group=self.dp_group)
