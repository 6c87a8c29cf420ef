"""The sharded checkpoint format: every rank writes only the state it owns; any layout reads it.

Files of ``DIR/iter_0000010/`` (format 2)::

    shard_00003.pt     rank 3's pieces: ``{"tensors": {key: 1-D tensor}, "rng": {...}}``
    index.json         global name -> the pieces holding it: file, key, kind, flat element
                       range [start, end) of the TP-local tensor, and how that local tensor
                       sits in the full one (TP rank / size, partition dim, parts, real rows)
    common.json        the trainer's counters, LR scheduler, loss scaler, Adam step, config, layout
    manifest.json      bytes and sha256 of every file

Who writes what: each rank writes, for each parameter piece in
:meth:`MixedPrecisionOptimizer.checkpoint_ranges` (its distributed-optimizer fragments, or the
same 1/DP partition of the grad buffer when every DP rank holds all of the state, so that DP
ranks share the writing), the ``param`` values (model dtype), the fp32 ``main`` params (only
when they differ from the params: bf16 / fp16) and Adam's ``exp_avg`` / ``exp_avg_sq``. The
last stage's copy of a tied embedding is not written (the first stage's is the same). A rank
therefore holds, besides its training state, one staging copy of its own share while saving:
at most 16 bytes per parameter of its (TP, PP) position divided by DP x CP.

Everything on disk is tensors, dicts, lists, strings and numbers: files are read with
``torch.load(weights_only=True, mmap=True)`` (no code can run; only the pieces used are paged
in) and JSON.
"""
from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

from ..model import named_global_parameters
from . import store
from .format import assemble, shard_for, shard_meta, tp_position

FORMAT = 2
OPTIMIZER_KINDS = ("main", "exp_avg", "exp_avg_sq")


def shard_file(rank: int) -> str:
    return f"shard_{rank:05d}.pt"


# -- writing ------------------------------------------------------------------------------
def snapshot(trainer) -> tuple[dict[str, torch.Tensor], dict[str, list[dict]]]:
    """Copies of the pieces this rank writes (CPU tensors) and their index entries by name."""
    ps, optimizer = trainer.pstate, trainer.optimizer
    params = dict(named_global_parameters(trainer.model))
    state = optimizer.state_dict()["fragments"]
    fname = shard_file(ps.rank)
    tensors, index = {}, {}
    for name, (start, end) in optimizer.checkpoint_ranges().items():
        p = params[name]
        if getattr(p, "shared_embedding", False):  # the first stage writes the tied embedding
            continue
        frag = state.get(name)
        pieces = {"param": p.detach().reshape(-1)[start:end]}
        for kind in OPTIMIZER_KINDS:
            if frag is not None and kind in frag and (kind != "main" or optimizer.copy_back):
                pieces[kind] = frag[kind].reshape(-1)[start - frag["start"]:end - frag["start"]]
        for kind, values in pieces.items():
            key = f"{name}:{kind}:{start}"
            tensors[key] = values.detach().to("cpu", copy=True)
            index.setdefault(name, []).append({
                "file": fname, "key": key, "kind": kind, "start": start, "end": end,
                "shape": list(p.shape), **shard_meta(p, *tp_position(p, ps))})
    return tensors, index


def rng_state(trainer) -> dict:
    """This rank's RNG states as plain data and tensors (loadable with ``weights_only``)."""
    np_state = np.random.get_state(legacy=False)
    state = {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
             "numpy_pos": int(np_state["state"]["pos"]), "numpy_has_gauss": int(np_state["has_gauss"]),
             "numpy_gauss": float(np_state["gauss"]), "torch": torch.get_rng_state(),
             "tracker": trainer.tracker.state_dict()}
    if trainer.device.type == "cuda":  # not on a --device cpu run of a GPU machine: no CUDA context for it
        state["cuda"] = torch.cuda.get_rng_state(trainer.device)
    return state


def set_rng_state(trainer, state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), None))
    np.random.set_state({"bit_generator": "MT19937", "has_gauss": state["numpy_has_gauss"],
                         "gauss": state["numpy_gauss"],
                         "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]}})
    torch.set_rng_state(state["torch"])
    trainer.tracker.load_state_dict(state["tracker"])
    if "cuda" in state and trainer.device.type == "cuda":  # a CUDA checkpoint resumes on the CPU too
        torch.cuda.set_rng_state(state["cuda"], trainer.device)


def write_shard(tmp: str, rank: int, tensors: dict, rng: dict) -> dict:
    """Write this rank's file into ``tmp``; returns its manifest entry, the digest read back
    from disk (so a short write is caught before the checkpoint is committed)."""
    path = os.path.join(tmp, shard_file(rank))
    written = store.save_file({"tensors": tensors, "rng": rng}, path)
    store.verify_file(path, written)
    return {shard_file(rank): written}


def write_json(obj, path: str) -> dict:
    """A JSON file, fsynced; returns its manifest entry."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": os.path.getsize(path), "sha256": store.file_digest(path)}


# -- reading ------------------------------------------------------------------------------
class ShardReader:
    """Reads pieces of a format-2 checkpoint: verifies each file once against the manifest,
    memory-maps it, and assembles any parameter's values for any target layout."""

    def __init__(self, directory: str, manifest: dict):
        self.directory, self.manifest = directory, manifest
        self.index = store.load_json(directory, manifest, "index.json")
        self.files: dict[str, dict] = {}

    def tensor(self, entry: dict) -> torch.Tensor:
        name = entry["file"]
        if name not in self.files:
            self.files[name] = store.load_verified(self.directory, self.manifest, name, mmap=True)
        return self.files[name]["tensors"][entry["key"]]

    def rng(self, rank: int) -> dict:
        return store.load_verified(self.directory, self.manifest, shard_file(rank), mmap=True)["rng"]

    def has(self, name: str, kind: str) -> bool:
        return any(e["kind"] == kind for e in self.index.get(name, []))

    def local(self, name: str, kind: str, param, tp_rank: int, tp_size: int, start: int, end: int) -> torch.Tensor:
        """Elements ``[start, end)`` of ``param``'s TP-local tensor of ``kind``, from whatever
        layout wrote them: read straight from the pieces when the TP split is the same, else
        through the full tensor (one parameter at a time: the staging bound of a load)."""
        entries = [e for e in self.index.get(name, []) if e["kind"] == kind]
        if not entries:
            raise KeyError(f"checkpoint {self.directory} has no {kind} of {name!r}")
        meta = shard_meta(param, tp_rank, tp_size)
        same = [e for e in entries if e["tp_size"] == tp_size and e["tp_rank"] == tp_rank
                and e["shape"] == list(param.shape) and e["partition_dim"] == meta["partition_dim"]]
        if same:
            return self._gather(same, start, end, name)
        local_by_rank = {}
        for e in entries:
            local_by_rank.setdefault(e["tp_rank"], []).append(e)
        pieces = [{**rank_entries[0], "tensor": self._gather(rank_entries, 0, _numel(rank_entries[0]), name)
                   .view(rank_entries[0]["shape"])} for rank_entries in local_by_rank.values()]
        return shard_for(assemble(pieces), param, tp_rank, tp_size).reshape(-1)[start:end]

    def _gather(self, entries: list[dict], start: int, end: int, name: str) -> torch.Tensor:
        """Elements ``[start, end)`` of one TP-local tensor from the pieces covering them."""
        out = torch.empty(end - start, dtype=self.tensor(entries[0]).dtype)
        covered = 0
        for e in entries:
            lo, hi = max(start, e["start"]), min(end, e["end"])
            if lo < hi:
                out[lo - start:hi - start] = self.tensor(e)[lo - e["start"]:hi - e["start"]]
                covered += hi - lo
        if covered != end - start:
            raise ValueError(f"checkpoint {self.directory}: the pieces of {name} cover {covered} of the "
                             f"{end - start} elements needed (a shard file is missing from the index?)")
        return out

    def full(self, name: str, kind: str = "param") -> torch.Tensor:
        """The full (TP=1, unpadded) tensor of ``name``, from any layout (for the converters)."""
        entries = [e for e in self.index[name] if e["kind"] == kind]
        by_rank = {}
        for e in entries:
            by_rank.setdefault(e["tp_rank"], []).append(e)
        pieces = [{**es[0], "tensor": self._gather(es, 0, _numel(es[0]), name).view(es[0]["shape"])}
                  for es in by_rank.values()]
        return assemble(pieces)


def _numel(entry: dict) -> int:
    n = 1
    for d in entry["shape"]:
        n *= d
    return n
