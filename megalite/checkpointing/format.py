"""Layout-independent checkpoint contents: TP shard metadata and (re)assembly.

A checkpoint stores, per (tp, pp) position, the *local* tensors of that position under their
*global* names (``layers.{i}...`` with the layer's index in the whole model, see
:func:`megalite.model.global_name`), each with the metadata needed to put it back into the
full tensor:

    {"tensor": local shard, "partition_dim": d or None, "parts": P, "tp_rank": r, "tp_size": t,
     "real_rows": vocab (embeddings: rows beyond are padding, not stored in the full tensor)}

:func:`assemble` rebuilds full tensors from any set of such pieces; :func:`shard_for` cuts the
slice a parameter of another layout needs. The full tensors are the TP=1, unpadded layout:
QKV rows grouped per key/value group ``[q_1..q_k, k, v]``, SwiGLU fc1 rows ``[gate; up]``.
"""
from __future__ import annotations

import torch


def tp_position(param: torch.nn.Parameter, pstate) -> tuple[int, int]:
    """``(rank, size)`` of ``param``'s tensor-parallel split: the expert-TP group's for MoE
    expert params (``param.expert_tp``), else the dense TP group's."""
    return getattr(param, "expert_tp", (pstate.tp_rank, pstate.tp_size))


def shard_meta(param: torch.nn.Parameter, tp_rank: int, tp_size: int) -> dict:
    """How ``param``'s local tensor sits inside its full tensor."""
    sharded = getattr(param, "tensor_model_parallel", False)
    return {"partition_dim": getattr(param, "partition_dim", 0) if sharded else None,
            "parts": getattr(param, "parts", 1), "tp_rank": tp_rank, "tp_size": tp_size,
            "real_rows": getattr(param, "real_rows", None)}


def assemble(pieces: list[dict]) -> torch.Tensor:
    """The full tensor from the pieces of all TP ranks (or the one piece if replicated)."""
    pieces = list({p["tp_rank"]: p for p in pieces}.values())  # tied-embedding copies: keep one
    first = pieces[0]
    if first["partition_dim"] is None:
        full = first["tensor"]
    else:
        pieces = sorted(pieces, key=lambda p: p["tp_rank"])
        if len(pieces) != first["tp_size"]:
            raise ValueError(f"checkpoint holds {len(pieces)} of {first['tp_size']} tensor-parallel shards")
        dim, parts = first["partition_dim"], first["parts"]
        blocks = [torch.cat([p["tensor"].chunk(parts, dim=dim)[b] for p in pieces], dim=dim) for b in range(parts)]
        full = torch.cat(blocks, dim=dim)
    if first.get("real_rows") is not None:
        full = full[: first["real_rows"]]
    return full


def shard_for(full: torch.Tensor, param: torch.nn.Parameter, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The slice of ``full`` that ``param`` holds in this layout (padding rows zero)."""
    real_rows = getattr(param, "real_rows", None)
    if real_rows is not None:
        if full.shape[0] != real_rows:
            raise ValueError(f"vocabulary mismatch: checkpoint has {full.shape[0]} rows, model {real_rows}")
        padded_rows = param.shape[0] * (tp_size if getattr(param, "tensor_model_parallel", False) else 1)
        full = torch.cat([full, full.new_zeros((padded_rows - full.shape[0],) + tuple(full.shape[1:]))])
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, parts = param.partition_dim, getattr(param, "parts", 1)
    return torch.cat([block.chunk(tp_size, dim=dim)[tp_rank] for block in full.chunk(parts, dim=dim)], dim=dim)
