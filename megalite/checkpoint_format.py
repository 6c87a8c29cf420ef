"""Layout-independent checkpoint contents: global parameter names and TP shard (re)assembly.

A checkpoint stores, per (tp, pp) position, the *local* tensors of that position under their
*global* names (``layers.{i}...`` with the layer's index in the whole model), each with the
metadata needed to put it back into the full tensor:

    {"tensor": local shard, "partition_dim": d or None, "parts": P, "tp_rank": r, "tp_size": t,
     "real_rows": vocab (embeddings: rows beyond are padding, not stored in the full tensor)}

:func:`assemble` rebuilds full tensors from any set of such pieces; :func:`shard_for` cuts the
slice a parameter of another layout needs. The full tensors are the TP=1, unpadded layout:
QKV rows grouped per key/value group ``[q_1..q_k, k, v]``, SwiGLU fc1 rows ``[gate; up]``.
"""
from __future__ import annotations

import hashlib
import os
import re

import torch

LAYER_RE = re.compile(r"^layers\.(\d+)\.(.*)$")


def global_name(chunk, local_name: str) -> str:
    """``layers.3.mlp.fc1.weight`` of a chunk starting at layer 4 -> ``layers.7.mlp.fc1.weight``."""
    m = LAYER_RE.match(local_name)
    if m:
        return f"layers.{chunk.layer_start + int(m.group(1))}.{m.group(2)}"
    return local_name


def local_name(chunk, name: str) -> str | None:
    """Inverse of :func:`global_name`; None when the chunk does not hold that layer."""
    m = LAYER_RE.match(name)
    if not m:
        return name
    index = int(m.group(1))
    if not chunk.layer_start <= index < chunk.layer_end:
        return None
    return f"layers.{index - chunk.layer_start}.{m.group(2)}"


def named_global_params(model_chunks):
    """``(global name, param)`` of every parameter this rank holds. The last stage's copy of a
    tied embedding is included (so a same-layout load reads only its own file); it is identical
    to the first stage's, and :func:`assemble` keeps one piece per TP rank."""
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            yield global_name(chunk, name), p


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


def file_digest(path: str) -> str:
    """sha256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str) -> None:
    """Make a directory entry (rename, new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_file(obj, path: str) -> dict:
    """torch.save + fsync; returns the manifest entry (size and sha256) of the file."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": os.path.getsize(path), "sha256": file_digest(path)}


def verify_file(path: str, entry: dict) -> None:
    """Raise a clear error when a checkpoint file is missing, truncated or corrupted."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file missing: {path}")
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        raise ValueError(f"checkpoint file {path} is truncated or changed: {size} bytes, expected {entry['bytes']}")
    if file_digest(path) != entry["sha256"]:
        raise ValueError(f"checkpoint file {path} is corrupted: sha256 does not match the manifest")
