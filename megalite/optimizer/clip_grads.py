"""Which gradients count toward the global grad norm (each element of the model once)."""
from __future__ import annotations

import torch


def norm_counted(param: torch.nn.Parameter, tp_rank: int) -> bool:
    """Sharded (TP) params count on every TP rank, replicated ones only on TP rank 0, and the
    last stage's copy of a tied embedding not at all (the first stage counts it). Expert params
    count everywhere: their norm is summed over the expert grid's ``tp_ep_pp`` group, in which
    every rank holds different expert shards."""
    if getattr(param, "shared_embedding", False):
        return False
    if getattr(param, "expert", False):
        return True
    return getattr(param, "tensor_model_parallel", False) or tp_rank == 0
