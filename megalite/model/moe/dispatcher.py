"""Token dispatch between the ranks of an expert group (the ``tp_ep`` group of the expert grid).

Every rank of the group holds different tokens (with TP > 1 sequence parallelism is required,
as in Megatron-Core), and the group holds every expert shard once: expert-parallel rank ``p``
holds experts ``[p E/EP, (p+1) E/EP)``, each split over the ETP ranks. A rank's place in the
group is ``etp_rank + ETP * ep_rank``.

* ``allgather``: all-gather the tokens and their routing over the group, run the local experts
  on the tokens routed to them, reduce-scatter the weighted outputs back (the sum adds the
  other experts' and the other ETP shards' contributions). Simple; communication grows with the
  group size.
* ``alltoall``: send each (token, expert) assignment only to the ranks holding that expert (its
  ETP shards), run the experts, send the partial outputs back, weight and add them up at the
  token's rank. Communication grows with k, not with the group size.

Both are autograd-correct: the backward of each collective is its mirror (all-gather <->
reduce-scatter, all-to-all <-> the reverse all-to-all).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ...tensor_parallel.mappings import (_gather_first_dim, gather_from_sequence_parallel, group_size,
                                         reduce_scatter_to_sequence_parallel)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 with uneven splits; backward sends the grads back."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def _assignments(weights: torch.Tensor, experts: torch.Tensor, keep: torch.Tensor | None = None):
    """Flatten ``[T, k]`` routing into per-assignment (expert, weight, token) vectors (only the
    ``keep`` ones when an expert capacity dropped some)."""
    tokens = torch.arange(experts.shape[0], device=experts.device).repeat_interleave(experts.shape[1])
    expert, weight = experts.reshape(-1), weights.reshape(-1)
    if keep is None:
        return expert, weight, tokens
    kept = keep.reshape(-1).nonzero(as_tuple=True)[0]
    return expert.index_select(0, kept), weight.index_select(0, kept), tokens.index_select(0, kept)


def allgather_dispatch(x, weights, experts, local_experts, group, keep=None) -> torch.Tensor:
    """``x [T, h]`` -> the MoE output ``[T, h]`` (see the module docstring)."""
    if group_size(group) > 1:
        x_all = gather_from_sequence_parallel(x, group, grad_is_partial=True)
        weights = gather_from_sequence_parallel(weights, group, grad_is_partial=True)
        experts = _gather_first_dim(experts, group)
        keep = None if keep is None else _gather_first_dim(keep.to(torch.uint8), group).bool()  # (gloo: no bool)
    else:
        x_all = x
    expert, weight, token = _assignments(weights, experts, keep)
    mine = ((expert >= local_experts.first) & (expert < local_experts.first + local_experts.num_local))
    mine = mine.nonzero(as_tuple=True)[0]
    out = local_experts(x_all, token.index_select(0, mine), expert.index_select(0, mine), weight.index_select(0, mine))
    return reduce_scatter_to_sequence_parallel(out, group) if group_size(group) > 1 else out


def alltoall_dispatch(x, weights, experts, local_experts, group, ep_size: int, etp_size: int,
                      keep=None) -> torch.Tensor:
    """``x [T, h]`` -> the MoE output ``[T, h]`` (see the module docstring)."""
    expert, weight, token = _assignments(weights, experts, keep)
    if group_size(group) == 1:
        return local_experts(x, token, expert, weight)
    dest_ep = torch.div(expert, local_experts.num_local, rounding_mode="floor")
    by_ep = [(dest_ep == p).nonzero(as_tuple=True)[0] for p in range(ep_size)]
    # Group rank a = etp + ETP * ep: every ETP shard of expert group p gets p's assignments.
    send = torch.cat([by_ep[a // etp_size] for a in range(ep_size * etp_size)])
    in_splits = [by_ep[a // etp_size].numel() for a in range(ep_size * etp_size)]
    counts = torch.tensor(in_splits, dtype=torch.int64, device=x.device)
    out_splits = _all_to_all(counts, [1] * len(in_splits), [1] * len(in_splits), group).tolist()
    received = _AllToAll.apply(x.index_select(0, token.index_select(0, send)), out_splits, in_splits, group)
    received_expert = _all_to_all(expert.index_select(0, send), out_splits, in_splits, group)
    rows = torch.arange(received.shape[0], device=received.device)  # one received row per assignment
    partial = _AllToAll.apply(local_experts(received, rows, received_expert), in_splits, out_splits, group)
    partial = partial * weight.index_select(0, send).unsqueeze(1).to(partial.dtype)
    return x.new_zeros(x.shape).index_add(0, token.index_select(0, send), partial)
