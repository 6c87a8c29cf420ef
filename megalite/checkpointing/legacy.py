"""Format 1 checkpoints (``model_tpXX_ppYY.pt``, ``common.pt``, ``rng_rankXXXXX.pt``): read only.

Written by megalite before the sharded format: per (tp, pp) position, DP rank 0 wrote the
params, fp32 main params and Adam moments of that position, whole along DP, keyed by global
name with TP shard metadata. They still load (also with ``weights_only``: the only classes
they hold beyond tensors and plain data are numpy's, for the numpy RNG state, allowed by name);
a new save writes the sharded format.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from . import store
from .format import assemble, shard_for

NUMPY_RNG_CLASSES = (np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType)


def is_legacy(manifest: dict) -> bool:
    return "common.pt" in manifest


class LegacyReader:
    """The pieces of a format-1 checkpoint, with the interface of :class:`.sharded.ShardReader`."""

    def __init__(self, directory: str, manifest: dict, tp_rank: int, pp_rank: int, same_split: bool):
        self.directory, self.manifest = directory, manifest
        files = ([f"model_tp{tp_rank:02d}_pp{pp_rank:02d}.pt"] if same_split
                 else sorted(k for k in manifest if k.startswith("model_")))
        self.pieces: dict[str, list[dict]] = {}
        for fname in files:
            for name, item in store.load_verified(directory, manifest, fname).items():
                self.pieces.setdefault(name, []).append(item)

    def has(self, name: str, kind: str) -> bool:
        key = "tensor" if kind == "param" else kind
        return any(key in x for x in self.pieces.get(name, []))

    def local(self, name: str, kind: str, param, tp_rank: int, tp_size: int, start: int, end: int) -> torch.Tensor:
        if name not in self.pieces:
            raise KeyError(f"checkpoint {self.directory} has no tensor {name!r}")
        key = "tensor" if kind == "param" else kind
        pieces = self.pieces[name]
        same = [x for x in pieces if x["tp_size"] == tp_size and x["tp_rank"] == tp_rank]
        if same and tuple(same[0][key].shape) == tuple(param.shape):
            return same[0][key].reshape(-1)[start:end]
        full = assemble([{**x, "tensor": x[key]} for x in pieces])
        return shard_for(full, param, tp_rank, tp_size).reshape(-1)[start:end]

    def rng(self, rank: int) -> dict:
        return store.load_verified(self.directory, self.manifest, f"rng_rank{rank:05d}.pt", allow=NUMPY_RNG_CLASSES)


def common_state(directory: str, manifest: dict) -> dict:
    return store.load_verified(directory, manifest, "common.pt")


def set_rng_state(trainer, state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    trainer.tracker.load_state_dict(state["tracker"])
    if "cuda" in state and trainer.device.type == "cuda":  # a CUDA checkpoint resumes on the CPU too
        torch.cuda.set_rng_state(state["cuda"], trainer.device)
