"""Gradient synchronisation after the backward passes of one iteration.

:func:`finalize_model_grads` does, each exactly once:

1. the data-parallel reduction (sum over the ``dp_cp`` group: the loss was already scaled by
   1 / tokens of the whole global batch, so a sum gives the mean-over-tokens gradient);
2. the all-reduce of the tied word-embedding grads between the first and last pipeline stage;
3. the all-reduce over TP of sequence-parallel params (norms, row-parallel biases), whose
   grads are partial sums over sequence shards.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..parallel_state import ParallelState


def all_reduce_coalesced(grads: list[torch.Tensor], group) -> None:
    """Sum ``grads`` over ``group`` with one all-reduce per dtype (flatten, reduce, copy back)."""
    if not grads or group is None or dist.get_world_size(group) == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for tensors in by_dtype.values():
        flat = _flatten_dense_tensors(tensors)
        dist.all_reduce(flat, group=group)
        for g, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
            g.copy_(synced)


def embedding_grads(model_chunks) -> list[torch.Tensor]:
    """Grads of the word-embedding copies a tied model keeps on its first and last stage."""
    grads = []
    for chunk in (model_chunks[0], model_chunks[-1]):
        emb = getattr(chunk, "word_embeddings", None)
        if emb is not None and emb.weight.grad is not None and (chunk.pre_process or chunk.post_process):
            if not chunk.cfg.untie_embeddings_and_output_weights and emb.weight.grad not in grads:
                grads.append(emb.weight.grad)
    return grads


def finalize_model_grads(model_chunks, pstate: ParallelState, reduce_data_parallel: bool = True) -> None:
    """Synchronise grads across DP, the embedding group and (for SP params) TP."""
    params = [p for chunk in model_chunks for p in chunk.parameters() if p.grad is not None]
    if reduce_data_parallel:
        all_reduce_coalesced([p.grad for p in params], pstate.dp_cp_group)
    if pstate.pp_size > 1 and pstate.in_embedding_group:
        all_reduce_coalesced(embedding_grads(model_chunks), pstate.embedding_group)
    all_reduce_coalesced([p.grad for p in params if getattr(p, "sequence_parallel", False)], pstate.tp_group)
