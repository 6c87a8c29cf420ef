"""Gradient synchronisation after the backward passes of one iteration.

:func:`finalize_model_grads` does, each exactly once, on the fp32 ``main_grad`` buffers:

1. the all-reduce of the tied word-embedding grads between the first and last pipeline stage
   (before the DP reduction: the embedding sits at different buffer offsets on the two
   stages, so with a reduce-scatter their shards would not line up afterwards);
2. the data-parallel reduction (sum over ``dp_cp``; the loss was already scaled by 1 / tokens
   of the whole global batch, so a sum gives the mean-over-tokens gradient), finishing the
   buckets that backward hooks may have started; MoE expert params sit in a buffer of their
   own, summed over the expert-data-parallel group ``edp`` (the ranks holding the same expert
   shard: each already saw every token routed to it from its whole ``tp_ep`` group);
3. the all-reduce over TP of sequence-parallel params (norms, row-parallel biases), whose
   grads are partial sums over sequence shards.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..parallel_state import ParallelState
from .grad_buffer import GradBuffer


def all_reduce_coalesced(tensors: list[torch.Tensor], group) -> None:
    """Sum ``tensors`` over ``group`` with one all-reduce per dtype (flatten, reduce, copy back)."""
    if not tensors or group is None or dist.get_world_size(group) == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = _flatten_dense_tensors(same)
        dist.all_reduce(flat, group=group)
        for t, synced in zip(same, _unflatten_dense_tensors(flat, same)):
            t.copy_(synced)


def tied_embedding_params(model_chunks, pstate: ParallelState) -> list[torch.nn.Parameter]:
    """The word-embedding copies of a tied model on its first and last stage (PP > 1 only)."""
    if pstate.pp_size == 1:
        return []
    params = []
    for chunk in model_chunks:
        emb = getattr(chunk, "word_embeddings", None)
        if emb is not None and not chunk.cfg.untie_embeddings_and_output_weights:
            params.append(emb.weight)
    return params


def finalize_model_grads(model_chunks, pstate: ParallelState, buffers: list[GradBuffer]) -> None:
    """Synchronise grads across the embedding group, DP (expert params: expert DP) and (for
    SP params) TP."""
    if pstate.in_embedding_group:
        all_reduce_coalesced([p.main_grad for p in tied_embedding_params(model_chunks, pstate)],
                             pstate.embedding_group)
    for buffer in buffers:
        buffer.finish_grad_sync()
    if pstate.tp_size > 1:
        params = [p for chunk in model_chunks for p in chunk.parameters()]
        all_reduce_coalesced([p.main_grad for p in params if getattr(p, "sequence_parallel", False)],
                             pstate.tp_group)
