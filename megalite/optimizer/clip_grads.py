"""Global gradient norm and clipping across tensor, pipeline and data-parallel shards."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..parallel_state import ParallelState


def counts_toward_norm(param: torch.nn.Parameter, tp_rank: int) -> bool:
    """A parameter's grad is counted once in the global norm: sharded (TP) params on every TP
    rank, replicated params only on TP rank 0, and the last stage's copy of a tied embedding
    not at all (the first stage counts it)."""
    if param.grad is None or getattr(param, "shared_embedding", False):
        return False
    return getattr(param, "tensor_model_parallel", False) or tp_rank == 0


def global_grad_norm(params, pstate: ParallelState, extra_sum_group=None) -> float:
    """L2 norm of all gradients of the model (every stage, every shard), counted once.

    Squares are summed over the model-parallel group (TP x PP). ``extra_sum_group`` adds a
    further sum, for optimizers whose grad shards differ across data-parallel ranks.
    """
    grads = [p.grad for p in params if counts_toward_norm(p, pstate.tp_rank)]
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros(1, dtype=torch.float32, device=device)
    if grads:
        norms = torch._foreach_norm([g.float() for g in grads]) if len(grads) > 1 else [grads[0].float().norm()]
        total += torch.stack([n * n for n in norms]).sum()
    for group in (pstate.mp_group, extra_sum_group):
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(total, group=group)
    return total.sqrt().item()


def clip_grads(params, max_norm: float, total_norm: float) -> None:
    """Scale all grads by ``max_norm / total_norm`` when the norm exceeds ``max_norm``."""
    if max_norm <= 0 or total_norm <= max_norm:
        return
    coeff = max_norm / (total_norm + 1e-6)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, coeff)
