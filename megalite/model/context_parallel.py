"""Context parallelism: the sequence of every sample is split across the CP ranks.

Load balancing for causal attention (as Megatron-Core): the sequence is cut into ``2 * CP``
equal chunks and CP rank ``i`` holds chunks ``i`` and ``2 * CP - 1 - i``, so every rank has
one early (cheap) and one late (expensive) chunk of the causal triangle. Everything
token-wise (embeddings, norms, MLP, loss) runs on the local tokens unchanged; only attention
needs the other ranks' tokens:

* :func:`context_parallel_attention` all-gathers K and V over the CP group (autograd-correct:
  the backward reduce-scatters their grads, so each rank receives the grads its keys got from
  every rank's queries) and masks with the *global* positions of queries and keys
  (``q_pos >= k_pos``). Each rank computes the attention of its own queries only.
* :func:`get_batch_on_this_cp_rank` cuts a micro-batch (tokens, labels, loss mask, position
  ids) to this rank's chunks; the model then uses global position ids for learned position
  embeddings and RoPE.

Grads of the (replicated) weights are partial over the CP ranks' tokens: they are summed
over the ``dp_cp`` group with the data-parallel reduction, and the loss is normalised by the
token count of the whole global batch (also summed over ``dp_cp``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..tensor_parallel.mappings import gather_from_sequence_parallel


def local_positions(seq_length: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """Global positions (``[seq_length / cp]``) of the tokens CP rank ``cp_rank`` holds."""
    if cp_size == 1:
        return torch.arange(seq_length, device=device)
    if seq_length % (2 * cp_size):
        raise ValueError(f"sequence length {seq_length} is not divisible by 2 x context-parallel size {cp_size}")
    chunk = seq_length // (2 * cp_size)
    first, second = cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([torch.arange(first, first + chunk, device=device),
                      torch.arange(second, second + chunk, device=device)])


def get_batch_on_this_cp_rank(batch: dict, cp_rank: int, cp_size: int) -> dict:
    """This CP rank's part of a micro-batch of ``[b, s]`` tensors (split along dim 1): tokens,
    labels, loss mask and, for packed documents, per-sample ``position_ids`` and ``document_ids``.

    Adds ``position_ids`` (global positions) when the batch has none, as one row broadcast over
    the batch (a stride-0 view: the model then builds one RoPE table for all samples).
    """
    tokens = batch["tokens"]
    seq = tokens.shape[1]
    index = local_positions(seq, cp_rank, cp_size, tokens.device)
    if cp_size > 1:
        batch = {k: (v.index_select(1, index).contiguous() if torch.is_tensor(v) and v.dim() >= 2
                     and v.shape[1] == seq else v) for k, v in batch.items()}
    if "position_ids" not in batch:
        batch = {**batch, "position_ids": index.expand(tokens.shape[0], -1)}
    return batch


def gather_positions(local_seq_length: int, cp_size: int, device=None) -> torch.Tensor:
    """Global positions of the keys after the all-gather: rank 0's tokens, then rank 1's, ..."""
    seq = local_seq_length * cp_size
    return torch.cat([local_positions(seq, r, cp_size, device) for r in range(cp_size)])


def all_gather_kv(x: torch.Tensor, cp_group) -> torch.Tensor:
    """All-gather ``[s/cp, ...]`` along the sequence over CP; backward reduce-scatters the grad."""
    return gather_from_sequence_parallel(x, cp_group, grad_is_partial=True)


def context_parallel_attention(q, k, v, dropout: float, ctx, document_mask=None) -> torch.Tensor:
    """Causal attention of this rank's queries against the keys/values of the whole sequence.

    ``q [s/cp, b, n, d]``, ``k, v [s/cp, b, g, d]`` hold the tokens of this rank's two chunks
    in order; returns ``[s/cp, b, n*d]``. A ``document_mask`` (built by
    ``DocumentMask.for_stage`` with the gathered keys' document ids) also keeps each query
    within its document.
    """
    pstate = ctx.pstate
    s, b = q.shape[:2]
    k, v = all_gather_kv(k, pstate.cp_group), all_gather_kv(v, pstate.cp_group)
    if document_mask is not None:
        mask = document_mask.additive(q.dtype)  # [b, 1, s/cp, s]
    else:
        q_pos = local_positions(s * pstate.cp_size, pstate.cp_rank, pstate.cp_size, q.device)
        k_pos = gather_positions(s, pstate.cp_size, q.device)
        mask = q_pos[:, None] >= k_pos[None, :]  # [s/cp, s]: True = may attend
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)
