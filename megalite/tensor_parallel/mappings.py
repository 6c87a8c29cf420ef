"""Autograd communication pairs for tensor and sequence parallelism.

Each function is one half of a pair whose forward is the other's backward:

===============================  ==========================  ==========================
function                         forward                     backward
===============================  ==========================  ==========================
copy_to_tensor_parallel          identity                    all-reduce
reduce_from_tensor_parallel      all-reduce                  identity
scatter_to_tensor_parallel       split last dim (keep mine)  all-gather last dim
gather_from_tensor_parallel      all-gather last dim         split last dim
scatter_to_sequence_parallel     split dim 0 (keep mine)     all-gather dim 0
gather_from_sequence_parallel    all-gather dim 0            reduce-scatter dim 0
reduce_scatter_to_sequence_par.  reduce-scatter dim 0        all-gather dim 0
===============================  ==========================  ==========================

Activations use Megatron's ``[sequence, batch, hidden]`` layout, so the sequence dimension
is dim 0 and its shards are contiguous. Every function takes the process group explicitly;
with a group of size 1 (or ``None``) it is the identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# torch >= 2.13 renamed the single-tensor collectives; keep working on older releases too.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group) -> int:
    """World size of ``group``; 1 for ``None`` (a single process)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# -- raw collectives (no autograd) --------------------------------------------------------
def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[-1] % size:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by tensor-parallel size {size}")
    return x.chunk(size, dim=-1)[group_rank(group)].contiguous()


def _gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    # Gather along dim 0 (contiguous chunks), then move the pieces to the last dim.
    out = torch.empty((size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_single(out, x.contiguous(), group=group)
    return torch.cat(out.chunk(size, dim=0), dim=-1)


def _split_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[0] % size:
        raise ValueError(f"sequence dimension {x.shape[0]} is not divisible by tensor-parallel size {size}")
    return x.chunk(size, dim=0)[group_rank(group)].contiguous()


def _gather_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    out = torch.empty((x.shape[0] * size,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_single(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[0] % size:
        raise ValueError(f"sequence dimension {x.shape[0]} is not divisible by tensor-parallel size {size}")
    out = torch.empty((x.shape[0] // size,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter_single(out, x.contiguous(), group=group)
    return out


# -- autograd pairs ----------------------------------------------------------------------
class _CopyToTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad, ctx.group), None


class _GatherFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad, ctx.group), None


class _ScatterToSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_first_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first_dim(grad, ctx.group), None


class _GatherFromSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, grad_is_partial):
        ctx.group, ctx.grad_is_partial = group, grad_is_partial
        return _gather_first_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        # After a column-parallel layer each rank holds a partial sum of the input grad:
        # reduce-scatter sums and shards it. Otherwise the grad is complete: just keep mine.
        if ctx.grad_is_partial:
            return _reduce_scatter_first_dim(grad, ctx.group), None, None
        return _split_first_dim(grad, ctx.group), None, None


class _ReduceScatterToSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_first_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first_dim(grad, ctx.group), None


def copy_to_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient (input of a column-parallel layer)."""
    return x if group_size(group) == 1 else _CopyToTensorParallel.apply(x, group)


def reduce_from_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward (output of a row-parallel layer); identity backward."""
    return x if group_size(group) == 1 else _ReduceFromTensorParallel.apply(x, group)


def scatter_to_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's slice of the last dim; all-gather the gradient."""
    return x if group_size(group) == 1 else _ScatterToTensorParallel.apply(x, group)


def gather_from_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the last dim; the gradient keeps this rank's slice."""
    return x if group_size(group) == 1 else _GatherFromTensorParallel.apply(x, group)


def scatter_to_sequence_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's slice of the sequence (dim 0); all-gather the gradient."""
    return x if group_size(group) == 1 else _ScatterToSequenceParallel.apply(x, group)


def gather_from_sequence_parallel(x: torch.Tensor, group, grad_is_partial: bool = True) -> torch.Tensor:
    """All-gather the sequence (dim 0). The gradient is reduce-scattered when each rank
    holds a partial sum of it (the usual case before a column-parallel layer), else split."""
    return x if group_size(group) == 1 else _GatherFromSequenceParallel.apply(x, group, grad_is_partial)


def reduce_scatter_to_sequence_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks and keep this rank's sequence slice (output of a row-parallel layer
    under sequence parallelism); all-gather the gradient."""
    return x if group_size(group) == 1 else _ReduceScatterToSequenceParallel.apply(x, group)
