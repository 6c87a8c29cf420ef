"""Tensor-parallel layers: column/row-parallel linear and vocab-parallel embedding.

A sharded layer builds the *full* weight with ``init_method`` (from the current torch RNG,
which must be equal on all tensor-parallel ranks) and keeps only its slice, so a TP=N model
starts from exactly the weights of the TP=1 model with the same seed.

Parameters carry two attributes the rest of the library reads:
``tensor_model_parallel`` (True when sharded; with ``partition_dim``) and ``sequence_parallel``
(True for replicated params whose grads are partial under sequence parallelism and must be
all-reduced over the TP group).

Zero-bubble schedules split each backward into B (input grads) and W (weight grads): while a
:class:`~.weight_grad.WeightGradStore` is attached to a weight, the linears (column, row, output
layer) defer its grad to the store (``weight_grad.py``), to be computed when the schedule runs W.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .mappings import (_gather_first_dim, _reduce_scatter_first_dim, copy_to_tensor_parallel,
                       gather_from_tensor_parallel, group_rank, group_size,
                       reduce_from_tensor_parallel, reduce_scatter_to_sequence_parallel,
                       scatter_to_tensor_parallel)
from .weight_grad import deferred_linear, store_of

InitMethod = Callable[[torch.Tensor], torch.Tensor]


class _SequenceParallelLinear(torch.autograd.Function):
    """``all_gather_seq(x) @ W.T + b`` that saves only the local sequence shard of ``x`` and
    all-gathers it again in backward (as Megatron), so SP keeps linear inputs at ``s/tp``.
    The input grad is reduce-scattered (each rank holds a partial sum over its columns)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(_gather_first_dim(x, group), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_input = _reduce_scatter_first_dim(grad.matmul(weight), ctx.group)
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            total = _gather_first_dim(x, ctx.group)
            grad_weight = grad2d.t().matmul(total.reshape(-1, total.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad2d.sum(dim=0)
        return grad_input, grad_weight, grad_bias, None


def linear_with_sequence_parallel_gather(x, weight, bias, group) -> torch.Tensor:
    """Column-parallel linear of a sequence-sharded input ``[s/tp, ...]`` (see _SequenceParallelLinear)."""
    if group_size(group) == 1:
        return _linear(x, weight, bias)
    store = store_of(weight, x, bias)
    if store is not None:
        return deferred_linear(x, weight, bias, store, sp_group=group)
    return _SequenceParallelLinear.apply(x, weight, bias, group)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, its weight grad deferred while a ``WeightGradStore`` is attached to the weight."""
    store = store_of(weight, x, bias)
    return F.linear(x, weight, bias) if store is None else deferred_linear(x, weight, bias, store)


def init_method_normal(std: float) -> InitMethod:
    """N(0, std) initialisation, Megatron's default for weights."""
    return partial(nn.init.normal_, mean=0.0, std=std)


def scaled_init_method_normal(std: float, num_layers: int) -> InitMethod:
    """N(0, std / sqrt(2 * num_layers)): Megatron's init for the output projections."""
    return init_method_normal(std / (2.0 * num_layers) ** 0.5)


def pad_vocab_size(vocab_size: int, divisible_by: int = 128, tp_size: int = 1) -> int:
    """Round the vocabulary up to a multiple of ``divisible_by * tp_size`` (as Megatron)."""
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def set_tensor_parallel_attributes(param: nn.Parameter, is_parallel: bool, partition_dim: int) -> None:
    param.tensor_model_parallel = is_parallel
    param.partition_dim = partition_dim


def _sharded_parameter(full_shape: tuple[int, int], partition_dim: int, group, init_method: InitMethod,
                       dtype, device, real_rows: int | None = None, parts: int = 1) -> nn.Parameter:
    """Initialise the full weight on CPU in fp32, keep this rank's slice along ``partition_dim``.

    ``real_rows`` (embeddings): only that many leading rows are initialised, the padding rows
    are zero, so the real rows do not depend on how much padding there is.
    ``parts``: the weight is ``parts`` equal blocks stacked along ``partition_dim`` (e.g. the
    gate and up projections of SwiGLU); each block is split across ranks separately, so every
    rank holds matching slices of all blocks.
    """
    full = torch.empty(full_shape, dtype=torch.float32)
    if real_rows is None:
        init_method(full)
    else:
        full.zero_()
        init_method(full[:real_rows])
    size = group_size(group)
    if full_shape[partition_dim] % (size * parts):
        raise ValueError(f"dimension {full_shape[partition_dim]} of a {full_shape} weight is not "
                         f"divisible by tensor-parallel size {size} x {parts} parts")
    rank = group_rank(group)
    shard = torch.cat([block.chunk(size, dim=partition_dim)[rank]
                       for block in full.chunk(parts, dim=partition_dim)], dim=partition_dim)
    param = nn.Parameter(shard.to(dtype=dtype, device=device).contiguous())
    set_tensor_parallel_attributes(param, size > 1, partition_dim)
    param.parts = parts              # checkpoints use these two to rebuild the full tensor
    param.real_rows = real_rows
    return param


class ColumnParallelLinear(nn.Module):
    """``Y = X A + b`` with ``A`` split along its output columns across the TP group.

    Input ``[s, b, in]`` (replicated, or sharded along s when ``sequence_parallel``); output
    ``[s, b, out / tp]`` unless ``gather_output``. Any leading dims work without SP.
    ``parts > 1`` splits each of that many stacked output blocks separately (SwiGLU gate/up).
    """

    def __init__(self, input_size: int, output_size: int, *, tp_group=None, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: bool = False,
                 init_method: InitMethod = init_method_normal(0.02), parts: int = 1,
                 params_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.tp_group, self.gather_output, self.sequence_parallel = tp_group, gather_output, sequence_parallel
        if gather_output and parts > 1:
            raise ValueError("ColumnParallelLinear: gather_output needs parts == 1")
        tp = group_size(tp_group)
        if output_size % tp:
            raise ValueError(f"ColumnParallelLinear output size {output_size} is not divisible by "
                             f"tensor-parallel size {tp}")
        if sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: gather_output is incompatible with sequence_parallel")
        self.input_size, self.output_size_per_partition = input_size, output_size // tp
        self.weight = _sharded_parameter((output_size, input_size), 0, tp_group, init_method,
                                         params_dtype, device, parts=parts)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition, dtype=params_dtype, device=device))
            set_tensor_parallel_attributes(self.bias, tp > 1, 0)
            self.bias.parts = parts  # [gate_r; up_r] like the weight: checkpoints reassemble by it
            self.bias.real_rows = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return linear_with_sequence_parallel_gather(x, self.weight, self.bias, self.tp_group)
        x = copy_to_tensor_parallel(x, self.tp_group)
        y = _linear(x, self.weight, self.bias)
        return gather_from_tensor_parallel(y, self.tp_group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """``Y = X A + b`` with ``A`` split along its input rows across the TP group.

    Input ``[s, b, in / tp]`` when ``input_is_parallel`` (the usual case after a
    ColumnParallelLinear), else the full input is scattered first. The partial products are
    all-reduced (or reduce-scattered along s under ``sequence_parallel``); the bias is added
    once, after the reduction.
    """

    def __init__(self, input_size: int, output_size: int, *, tp_group=None, bias: bool = True,
                 input_is_parallel: bool = True, sequence_parallel: bool = False,
                 init_method: InitMethod = init_method_normal(0.02),
                 params_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.tp_group, self.input_is_parallel, self.sequence_parallel = tp_group, input_is_parallel, sequence_parallel
        tp = group_size(tp_group)
        if input_size % tp:
            raise ValueError(f"RowParallelLinear input size {input_size} is not divisible by "
                             f"tensor-parallel size {tp}")
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel requires input_is_parallel=True")
        self.input_size_per_partition, self.output_size = input_size // tp, output_size
        self.weight = _sharded_parameter((output_size, input_size), 1, tp_group, init_method,
                                         params_dtype, device)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=params_dtype, device=device))
            set_tensor_parallel_attributes(self.bias, False, 0)
            # Under SP each rank adds the bias to its own sequence slice only: partial grads.
            self.bias.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel(x, self.tp_group)
        y = _linear(x, self.weight, None)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel(y, self.tp_group)
        else:
            y = reduce_from_tensor_parallel(y, self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the (padded) vocabulary across the TP group.

    ``num_embeddings`` is the real vocabulary; the table is padded to ``padded_vocab_size``
    (see :func:`pad_vocab_size`) with zero rows that no real token id reaches. Each rank looks
    up the ids in its range, zeroes the rest, and the partial results are summed over TP
    (reduce-scattered along dim 0 when ``sequence_parallel``: ids must then be ``[s, b]``).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group=None,
                 padded_vocab_size: int | None = None, sequence_parallel: bool = False,
                 init_method: InitMethod = init_method_normal(0.02),
                 params_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.num_embeddings = num_embeddings
        self.padded_vocab_size = padded_vocab_size or num_embeddings
        if self.padded_vocab_size < num_embeddings:
            raise ValueError(f"padded vocab size {self.padded_vocab_size} < vocab size {num_embeddings}")
        tp = group_size(tp_group)
        if self.padded_vocab_size % tp:
            raise ValueError(f"padded vocab size {self.padded_vocab_size} is not divisible by "
                             f"tensor-parallel size {tp}")
        per_partition = self.padded_vocab_size // tp
        self.vocab_start = group_rank(tp_group) * per_partition
        self.vocab_end = self.vocab_start + per_partition
        self.weight = _sharded_parameter((self.padded_vocab_size, embedding_dim), 0, tp_group,
                                         init_method, params_dtype, device, real_rows=num_embeddings)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.tp_group) == 1:
            out = F.embedding(ids, self.weight)
        else:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
            out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel(out, self.tp_group)
        return reduce_from_tensor_parallel(out, self.tp_group)


def parallel_lm_logits(hidden: torch.Tensor, weight: torch.Tensor, tp_group=None,
                       sequence_parallel: bool = False, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Vocab-parallel logits ``hidden @ weight.T`` for a ``[vocab/tp, h]`` weight shard.

    The result stays split along the vocabulary; feed it to ``vocab_parallel_cross_entropy``
    (no full-vocab gather needed).
    """
    if sequence_parallel:
        return linear_with_sequence_parallel_gather(hidden, weight, bias, tp_group)
    return _linear(copy_to_tensor_parallel(hidden, tp_group), weight, bias)
