"""Megatron's ``torch_dist`` checkpoints (megatron-core ``dist_checkpointing``), read and written on
CPU in one process, without megatron-core and without a process group; and :func:`safe_load`,
the restricted loading every Megatron file goes through.

An iteration directory holds::

    metadata.json      {"sharded_backend": "torch_dist", ...}
    common.pt          the non-sharded state: args, iteration, checkpoint_version, content_metadata...
    .metadata          torch.distributed.checkpoint (DCP) metadata: every key's global shape, its
                       chunks (offsets, sizes) and where each chunk's bytes are
    __R_T.distcp       the chunks written by rank R's thread T, each a ``torch.save``'d tensor

Keys are global: ``embedding.word_embeddings.weight`` (padded vocabulary), and the decoder layers
either *stacked* (megatron-core's default for homogeneous layers: ``decoder.layers.mlp.linear_fc1.weight``
of shape ``[num_layers, ...]``) or *per layer* (``non_homogeneous_layers`` / ``singleton_local_shards``:
``decoder.layers.{i}.mlp.linear_fc1.weight``, a SwiGLU fc1 then possibly as ``weight_w`` (gate) and
``weight_v`` (up)). The norms are named as the Transformer-Engine spec names them
(``self_attention.linear_qkv.layer_norm_weight``) whichever spec saved them. Optimizer and RNG
state (``optimizer.*``, ``rng_state``) are not read.

**Nothing in a file runs.** :func:`safe_load` (``common.pt``, legacy ``model_optim_rng.pt``) lists
the classes a file references without unpickling it, refuses any outside an allow-list of module
prefixes (argparse, megatron, numpy, torch, transformer_engine, ...), and loads with
``torch.load(weights_only=True)`` where each listed class is replaced by an inert stand-in
(:class:`Opaque`) registered under its qualified name: the saved ``args`` namespace becomes an
:class:`Opaque` whose attributes are the flags, an enum or a numpy RNG state one holding its
arguments; no class from the file is imported. ``.metadata`` is unpickled by
:class:`_MetadataUnpickler`, which builds only torch.Size, dtypes and stand-ins for the DCP /
megatron-core classes and refuses every other class; each chunk is read with
``torch.load(weights_only=True)``. Writing uses ``torch.distributed.checkpoint.save`` (one
process), in the stacked layout, with megatron-core's ``content_metadata``.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import warnings

import torch

from ...checkpointing import store
from .. import ConversionError
from . import (EXTRA_STATE_MODULES, LAYER_PREFIX, split_layer_name, transformer_engine_names)

BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
           "common_backend_version": 1}
# What Megatron-LM (megatron-core >= 0.14) records about the layout of its sharded state dicts.
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                    "distrib_optim_sharding_type": "dp_reshardable"}
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
CHECKPOINT_VERSION = 3.0
# Classes a Megatron checkpoint may reference (as inert stand-ins); anything else is refused.
ALLOWED_PREFIXES = ("argparse.", "megatron.", "numpy.", "torch.", "transformer_engine.", "apex.", "io.",
                    "_io.", "pathlib.", "types.SimpleNamespace", "signal.", "enum.", "collections.",
                    "datetime.")


# -- loading without running code --------------------------------------------------------
class Opaque:
    """An inert stand-in for an object of a class a checkpoint names: it keeps the constructor
    arguments (``_args``) and the pickled state (as attributes when it is a dict), and does nothing."""
    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.__dict__["_args"] = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict state, slot state)
        if isinstance(state, dict) and all(isinstance(k, str) for k in state):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<{self.qualname} stand-in>"


_STAND_INS: dict[str, type] = {}


def stand_in(qualname: str) -> type:
    """The (cached) :class:`Opaque` subclass standing in for class or function ``qualname``."""
    if qualname not in _STAND_INS:
        _STAND_INS[qualname] = type(qualname.rsplit(".", 1)[-1], (Opaque,), {"qualname": qualname})
    return _STAND_INS[qualname]


def refuse_foreign(path: str, names) -> None:
    foreign = sorted(n for n in names if not n.startswith(ALLOWED_PREFIXES))
    if foreign:
        raise ValueError(f"checkpoint file {path} references {', '.join(foreign[:4])}, outside the allow-list of "
                         "a Megatron checkpoint; refusing to load it (nothing in it was run)")


def safe_load(path: str, mmap: bool = True):
    """A Megatron ``torch.save`` file, loaded without running code from it (see the module doc)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file missing: {path}")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - not a zip-format torch file
        raise ValueError(f"checkpoint file {path} is not a readable torch.save file: {e}") from None
    refuse_foreign(path, names)
    try:
        with torch.serialization.safe_globals([(stand_in(n), n) for n in names]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[-1]
        raise ValueError(f"checkpoint file {path} could not be loaded safely (nothing in it was run): {reason}") \
            from None




class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file into plain data: torch.Size, dtypes and layouts are the real
    objects, the DCP and megatron-core classes inert stand-ins; any other class is refused."""

    def find_class(self, module: str, name: str):
        full = f"{module}.{name}"
        if full == "torch.Size":
            return torch.Size
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
            return getattr(torch, name)
        if full == "torch.serialization._get_layout":
            return str  # the layout's name is enough
        if full == "collections.OrderedDict":
            return collections.OrderedDict
        if module.startswith(("torch.distributed.checkpoint", "megatron.")) or module == "pathlib":
            return stand_in(full)  # pathlib: StorageMeta.checkpoint_id
        raise pickle.UnpicklingError(f"{full} is not allowed in a checkpoint's .metadata")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a checkpoint's .metadata")


def read_metadata(directory: str):
    """The DCP metadata of ``directory`` (stand-in objects; nothing in the file runs)."""
    path = os.path.join(directory, ".metadata")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"torch_dist checkpoint {directory} has no .metadata file")
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise ValueError(f"checkpoint file {path} could not be read safely (nothing in it was run): {e}") from None


def _kind(obj) -> str:
    return getattr(type(obj), "qualname", type(obj).__name__).rsplit(".", 1)[-1]


class _ChunkReader:
    """Reads tensor chunks out of the ``.distcp`` files (one open file per name)."""

    def __init__(self, directory: str, storage_data: dict):
        self.directory, self.files = directory, {}
        self.where = {(idx.fqn, tuple(getattr(idx, "offset", None) or ())): info
                      for idx, info in storage_data.items()}

    def read(self, fqn: str, offsets) -> torch.Tensor:
        info = self.where.get((fqn, tuple(offsets)))
        if info is None:
            raise ValueError(f"{self.directory}/.metadata has no storage entry for {fqn} at {tuple(offsets)}")
        if getattr(info, "transform_descriptors", None):
            raise ConversionError(f"{fqn} is stored with transforms {info.transform_descriptors} (e.g. compression): "
                                  "not supported")
        if info.relative_path not in self.files:
            path = os.path.join(self.directory, info.relative_path)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"checkpoint file missing: {path}")
            self.files[info.relative_path] = open(path, "rb")
        f = self.files[info.relative_path]
        f.seek(info.offset)
        data = f.read(info.length)
        if len(data) != info.length:
            raise ValueError(f"checkpoint file {f.name} is truncated: {fqn} needs bytes "
                             f"[{info.offset}, {info.offset + info.length})")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _read_tensor(reader: _ChunkReader, fqn: str, meta) -> torch.Tensor:
    """A key's global tensor from its chunks (every element must be covered)."""
    full, covered = None, 0
    for chunk in meta.chunks:
        piece = reader.read(fqn, chunk.offsets)
        if full is None:
            full = torch.empty(tuple(meta.size), dtype=piece.dtype)
        index = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))
        full[index] = piece.reshape(tuple(chunk.sizes))
        covered += piece.numel()
    if full is None or covered != full.numel():
        raise ValueError(f"{fqn}: its chunks cover {covered} of {0 if full is None else full.numel()} elements")
    return full


def _unstack(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-layer names (``decoder.layers.{i}.``) for stacked keys; SwiGLU ``weight_w`` / ``weight_v``
    (gate / up) joined into one ``linear_fc1`` tensor."""
    out = {}
    for key, t in tensors.items():
        if key.startswith(LAYER_PREFIX) and split_layer_name(key) is None:
            suffix = key[len(LAYER_PREFIX):]
            for i in range(t.shape[0]):
                out[f"{LAYER_PREFIX}{i}.{suffix}"] = t[i].clone()
        else:
            out[key] = t
    for key in [k for k in out if k.endswith(("_w", "_v")) and "linear_fc1." in k]:
        base = key[:-2]
        if key.endswith("_w"):
            out[base] = torch.cat([out.pop(key), out.pop(base + "_v")])
    return out


def read_torch_dist(directory: str) -> tuple[object, int, dict[str, torch.Tensor]]:
    """``(args, iteration, Megatron full state dict)`` of a torch_dist iteration directory."""
    with open(os.path.join(directory, "metadata.json")) as f:
        backend = json.load(f)
    if backend.get("sharded_backend") != "torch_dist":
        raise ConversionError(f"{directory}: sharded backend {backend.get('sharded_backend')!r}, expected torch_dist")
    common = safe_load(os.path.join(directory, "common.pt"))
    args = common.get("args")
    if args is None:
        raise ConversionError(f"{directory}/common.pt holds no 'args': the model flags cannot be known")
    metadata = read_metadata(directory)
    reader = _ChunkReader(directory, metadata.storage_data)
    try:
        tensors = {fqn: _read_tensor(reader, fqn, meta) for fqn, meta in metadata.state_dict_metadata.items()
                   if fqn.startswith(MODEL_PREFIXES) and _kind(meta) == "TensorStorageMetadata"}
    finally:
        reader.close()
    return args, int(common.get("iteration", 0)), _unstack(tensors)


def _stacked(full: dict, num_layers: int) -> dict[str, torch.Tensor]:
    """Stacked ``decoder.layers.<suffix>`` tensors ``[num_layers, ...]`` with Transformer-Engine names."""
    full = transformer_engine_names(full)
    out, suffixes = {}, []
    for name in full:
        layer = split_layer_name(name)
        if layer is None:
            out[name] = full[name]
        elif layer[0] == 0:
            suffixes.append(layer[1])
    for suffix in suffixes:
        out[LAYER_PREFIX + suffix] = torch.stack([full[f"{LAYER_PREFIX}{i}.{suffix}"] for i in range(num_layers)])
    return out


def _extra_states(num_layers: int) -> dict[str, io.BytesIO]:
    """megatron-core's ShardedObjects of the linear layers' ``_extra_state`` (None for the local spec;
    Transformer Engine accepts None too), serialised as megatron-core does: ``torch.save([data])``."""
    out = {}
    for module in EXTRA_STATE_MODULES:
        for i in range(num_layers):
            buffer = io.BytesIO()
            torch.save([None], buffer)
            out[f"{LAYER_PREFIX}{module}._extra_state/shard_{i}_{num_layers}"] = buffer
    return out


def write_torch_dist(full: dict, args: dict, root: str, iteration: int, dtype: torch.dtype = torch.float32) -> str:
    """Write a Megatron full state dict as a torch_dist checkpoint (stacked layers, any TP / PP can
    load it) under ``root``, atomically: temp dir, manifest, rename, tracker last."""
    import torch.distributed.checkpoint as dcp  # imported here: loading it is slow

    class RawBytesPlanner(dcp.DefaultSavePlanner):
        def transform_object(self, write_item, object):  # noqa: A002 - DCP's name
            return object  # already serialised, as megatron-core's MCoreSavePlanner leaves them

    if os.path.exists(store.iteration_dir(root, iteration)):
        raise FileExistsError(f"{store.iteration_dir(root, iteration)} exists: convert into an empty --save directory")
    num_layers = args["num_layers"]
    state = {k: v.to(dtype).contiguous() for k, v in _stacked(full, num_layers).items()}
    state.update(_extra_states(num_layers))
    tmp = store.begin(root, iteration)
    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": intended
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, thread_count=1), planner=RawBytesPlanner(),
                 no_dist=True)
    common = {"args": argparse.Namespace(**{**args, "iteration": iteration}), "checkpoint_version": CHECKPOINT_VERSION,
              "iteration": iteration, "content_metadata": CONTENT_METADATA}
    manifest = {"common.pt": store.save_file(common, os.path.join(tmp, "common.pt"))}
    with open(os.path.join(tmp, "metadata.json"), "w") as f:
        json.dump(BACKEND, f)
    for name in sorted(os.listdir(tmp)):
        if name not in manifest:
            manifest[name] = {"bytes": os.path.getsize(os.path.join(tmp, name)),
                              "sha256": store.file_digest(os.path.join(tmp, name))}
    return store.commit(root, iteration, tmp, manifest)
