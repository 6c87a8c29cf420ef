"""The MoE layer: router, dispatch to the (expert-parallel) experts, optional shared expert."""
from __future__ import annotations

import math

import torch
from torch import nn

from .dispatcher import allgather_dispatch, alltoall_dispatch
from .experts import LocalExperts
from .router import TopKRouter


def within_capacity(weights: torch.Tensor, experts: torch.Tensor, num_experts: int, factor: float,
                    policy: str) -> torch.Tensor:
    """``[T, k]`` bool: the (token, expert) assignments each expert keeps when it takes at most
    ``ceil(factor * T * k / E)`` of this rank's ``T`` tokens: those of highest routing weight
    (``probs``) or the earliest (``position``), as Megatron-Core's token dropping. ``T`` is the
    rank's own tokens, so what is dropped depends on the layout (TP/SP, CP, DP split)."""
    T, k = experts.shape
    capacity = math.ceil(factor * T * k / num_experts)
    flat = experts.reshape(-1)
    order = (torch.argsort(weights.reshape(-1), descending=True, stable=True) if policy == "probs"
             else torch.arange(flat.numel(), device=flat.device))  # (flattened [T, k]: token order)
    order = order[torch.argsort(flat[order], stable=True)]       # grouped by expert, ranked within
    counts = torch.bincount(flat, minlength=num_experts)
    first = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(flat.numel(), device=flat.device) - first[flat[order]]
    keep = torch.empty_like(flat, dtype=torch.bool)
    keep[order] = rank_in_expert < capacity
    return keep.view(T, k)


class MoELayer(nn.Module):
    """Replaces a dense MLP: ``[s, b, h] -> [s, b, h]`` (``s`` this rank's sequence shard).

    ``shared_expert`` (a dense tensor-parallel MLP, ``--moe-shared-expert-intermediate-size``)
    sees every token and is added to the routed experts' output."""

    def __init__(self, cfg, ctx, layer_number: int, shared_expert: nn.Module | None = None):
        super().__init__()
        ps = ctx.pstate
        self.pstate, self.dispatcher = ps, cfg.moe_token_dispatcher_type
        # A micro-batch's tokens are split over TP (under SP) and CP: the router's statistics too.
        stat_groups = ((ps.tp_group,) if ctx.sequence_parallel else ()) + (ps.cp_group,)
        self.router = TopKRouter(cfg, ctx.moe, stat_groups, layer_number, ctx.sequence_parallel)
        base_seed = int(torch.randint(2 ** 31 - cfg.num_experts, ()))  # from the layer's seeded stream
        self.experts = LocalExperts(cfg, ps, base_seed)
        self.shared_expert = shared_expert
        self.capacity_factor, self.drop_policy = cfg.moe_expert_capacity_factor, cfg.moe_token_drop_policy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b, h = x.shape
        tokens = x.reshape(s * b, h)
        weights, experts = self.router(tokens, b)
        keep = None
        if self.capacity_factor is not None:
            keep = within_capacity(weights.detach(), experts, self.router.num_experts, self.capacity_factor,
                                   self.drop_policy)
        if self.dispatcher == "alltoall":
            out = alltoall_dispatch(tokens, weights, experts, self.experts, self.pstate.tp_ep_group,
                                    self.pstate.ep_size, self.pstate.etp_size, keep)
        else:
            out = allgather_dispatch(tokens, weights, experts, self.experts, self.pstate.tp_ep_group, keep)
        out = out.view(s, b, h)
        return out if self.shared_expert is None else out + self.shared_expert(x)
