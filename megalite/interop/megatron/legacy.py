"""Megatron-LM checkpoints on disk: finding them, the legacy format (``--ckpt-format torch``),
and :func:`read_megatron_checkpoint` / :func:`write_megatron_checkpoint` for both formats
(``torch_dist`` itself is :mod:`.torch_dist`).

Legacy layout (Megatron-LM ``training/checkpointing.py``)::

    DIR/latest_checkpointed_iteration.txt            "1000" (or "release": DIR/release/)
    DIR/iter_0001000/mp_rank_TT/model_optim_rng.pt          PP = 1
    DIR/iter_0001000/mp_rank_TT_PPP/model_optim_rng.pt      PP > 1 (an expert rank _EEE is refused)

each file ``{"args": argparse.Namespace, "checkpoint_version": 3.0, "iteration": N,
"model": GPTModel.state_dict_for_save_checkpoint()}`` (``model0``, ``model1``... with virtual
pipeline stages; ``optimizer``, ``opt_param_scheduler``, ``rng_state``... are not read). Layer
indices are local to a model chunk: pipeline stages are put back in order, and chunk ``v`` of
pipeline rank ``r`` is virtual stage ``v * PP + r``. Every file is loaded with
:func:`.torch_dist.safe_load`: nothing in it runs.
"""
from __future__ import annotations

import argparse
import os
import re

import torch

from ...checkpointing import store
from .. import ConversionError
from .torch_dist import CHECKPOINT_VERSION, read_torch_dist, safe_load, write_torch_dist
from . import (EXTRA_STATE_MODULES, LAYER_PREFIX, TE_EXTRA_STATE_MODULES, merge_tp, split_layer_name,
                       split_tp, transformer_engine_names)

CHECKPOINT_FILE = "model_optim_rng.pt"
FORMATS = ("torch_dist", "torch")
_MP_RANK = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


# -- directories ---------------------------------------------------------------------------
def find_checkpoint(path: str) -> tuple[int, str]:
    """``(iteration, directory)``: the latest checkpoint of a Megatron save directory (its tracker
    file), or ``path`` itself when it is an ``iter_XXXXXXX`` / ``release`` directory."""
    tracker = os.path.join(path, store.TRACKER)
    if os.path.isfile(tracker):
        with open(tracker) as f:
            text = f.read().strip()
        if text == "release":
            return 0, os.path.join(path, "release")
        if not text.isdigit():
            raise ValueError(f"{tracker}: expected an iteration number or 'release', found {text!r}")
        return int(text), store.iteration_dir(path, int(text))
    if detect_format(path, missing_ok=True):
        match = re.search(r"iter_(\d+)$", os.path.normpath(path))
        return (int(match.group(1)) if match else 0), path
    raise FileNotFoundError(f"no Megatron checkpoint in {path}: {tracker} is missing")


def detect_format(directory: str, missing_ok: bool = False) -> str | None:
    """``torch_dist`` (a ``metadata.json``) or ``torch`` (``mp_rank_*`` directories)."""
    if os.path.isfile(os.path.join(directory, "metadata.json")):
        return "torch_dist"
    if os.path.isdir(directory) and any(_MP_RANK.match(d) for d in os.listdir(directory)):
        return "torch"
    if missing_ok:
        return None
    raise FileNotFoundError(f"{directory} holds neither a torch_dist checkpoint (metadata.json) nor "
                            "legacy mp_rank_* directories")


def _rank_files(directory: str) -> dict[tuple[int, int], str]:
    files = {}
    for d in os.listdir(directory):
        match = _MP_RANK.match(d)
        if not match:
            continue
        if match.group(3) is not None:
            raise ConversionError(f"{d}: expert-parallel (MoE) checkpoints are not supported")
        files[int(match.group(1)), int(match.group(2) or 0)] = os.path.join(directory, d, CHECKPOINT_FILE)
    tp, pp = max(t for t, _ in files) + 1, max(p for _, p in files) + 1
    missing = [f"mp_rank_{t:02d}_{p:03d}" for t in range(tp) for p in range(pp) if (t, p) not in files]
    if missing:
        raise FileNotFoundError(f"{directory}: {tp} x {pp} (TP x PP) ranks expected, missing {missing[:4]}")
    return files


# -- reading -------------------------------------------------------------------------------
def _chunk_keys(state: dict) -> list[str]:
    if "model" in state:
        return ["model"]
    keys = sorted((k for k in state if re.fullmatch(r"model\d+", k)), key=lambda k: int(k[5:]))
    if not keys:
        raise ConversionError("Megatron checkpoint file has no 'model' (or model0, model1...) state")
    return keys


def _layer_count(sd: dict) -> int:
    layers = {layer[0] for layer in map(split_layer_name, sd) if layer is not None}
    if layers and layers != set(range(len(layers))):
        raise ConversionError(f"layer indices {sorted(layers)} of a model chunk are not 0..n-1")
    return len(layers)


def _chunk_offsets(counts: dict[tuple[int, int], int], pp: int, chunks: int) -> dict[tuple[int, int], int]:
    """First global layer of each (pp rank, chunk): stages in order; with virtual stages, chunk v of
    rank r is virtual stage v * PP + r (uniform sizes)."""
    order = sorted(counts, key=lambda rc: rc[1] * pp + rc[0])
    if chunks > 1 and len(set(counts.values())) > 1:
        raise ConversionError(f"virtual pipeline chunks of unequal sizes {sorted(set(counts.values()))}")
    offsets, start = {}, 0
    for rc in order:
        offsets[rc] = start
        start += counts[rc]
    return offsets


def read_legacy(directory: str) -> tuple[object, int, dict[str, torch.Tensor]]:
    """``(args, iteration, Megatron full state dict)`` of a legacy checkpoint directory of any TP,
    PP and virtual-pipeline layout (``_extra_state`` entries and non-model state dropped)."""
    files = _rank_files(directory)
    tp, pp = max(t for t, _ in files) + 1, max(p for _, p in files) + 1
    states = {key: safe_load(path) for key, path in files.items()}
    first = states[0, 0]
    version = first.get("checkpoint_version", 0)
    if version < CHECKPOINT_VERSION:
        raise ConversionError(f"checkpoint_version {version}: only megatron-core checkpoints (3.0) are supported")
    args = first.get("args")
    if args is None:
        raise ConversionError(f"{files[0, 0]} holds no 'args': the model flags cannot be known")
    swiglu = bool(getattr(args, "swiglu", False))
    chunks = _chunk_keys(first)
    counts = {(r, v): _layer_count(states[0, r][key]) for r in range(pp) for v, key in enumerate(chunks)}
    offsets = _chunk_offsets(counts, pp, len(chunks))
    full: dict[str, torch.Tensor] = {}
    for (r, v), offset in offsets.items():
        shards = [states[t, r][chunks[v]] for t in range(tp)]
        for name in shards[0]:
            if name.endswith("_extra_state") or shards[0][name] is None:
                continue
            if name.startswith("language_model."):
                raise ConversionError(f"{name}: Megatron-LM legacy (non-megatron-core) models are not supported")
            layer = split_layer_name(name)
            target = f"{LAYER_PREFIX}{layer[0] + offset}.{layer[1]}" if layer else name
            tensor = merge_tp(name, [s[name] for s in shards], swiglu)
            if target in full and not torch.equal(full[target], tensor):
                raise ConversionError(f"{target} is stored twice with different values")
            full[target] = tensor.clone()
    return args, int(first.get("iteration", 0)), full


# -- writing -------------------------------------------------------------------------------
def _chunk_state(full: dict, layers: range, first: bool, last: bool, tied: bool, transformer_engine: bool,
                 tp: int, tp_rank: int, swiglu: bool, dtype) -> dict:
    """One model chunk's state dict on one TP rank, named as megatron-core's GPTModel names it."""
    sd = {}

    def put(local, name):
        sd[local] = split_tp(name, full[name], tp, tp_rank, swiglu).to(dtype).clone()

    if first:
        for name in ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight"):
            if name in full:
                put(name, name)
    modules = TE_EXTRA_STATE_MODULES if transformer_engine else EXTRA_STATE_MODULES
    for local_index, i in enumerate(layers):
        prefix = f"{LAYER_PREFIX}{i}."
        for name in [n for n in full if n.startswith(prefix)]:
            put(f"{LAYER_PREFIX}{local_index}.{name[len(prefix):]}", name)
        for module in modules:
            sd[f"{LAYER_PREFIX}{local_index}.{module}._extra_state"] = None
    if last:
        for name in ("decoder.final_layernorm.weight", "decoder.final_layernorm.bias"):
            if name in full:
                put(name, name)
        if not tied:
            put("output_layer.weight", "output_layer.weight")
        elif not first:  # the last stage's copy of the tied embedding
            put("output_layer.weight", "embedding.word_embeddings.weight")
        sd["output_layer._extra_state"] = None
    return transformer_engine_names(sd) if transformer_engine else sd


def write_legacy(full: dict, args: dict, root: str, tp: int, pp: int, iteration: int, vpp: int | None = None,
                 transformer_engine: bool = False, dtype: torch.dtype = torch.float32) -> str:
    """Write a Megatron full state dict as a legacy checkpoint of TP x PP (x ``vpp`` virtual stages)
    under ``root``, through megalite's atomic directory protocol (temp dir, manifest, rename,
    tracker last); returns the iteration directory."""
    num_layers, chunks = args["num_layers"], vpp or 1
    if num_layers % (pp * chunks):
        raise ConversionError(f"{num_layers} layers do not split into {pp} stages x {chunks} virtual stages")
    if os.path.exists(store.iteration_dir(root, iteration)):
        raise FileExistsError(f"{store.iteration_dir(root, iteration)} exists: convert into an empty --save directory")
    per_chunk, tied = num_layers // (pp * chunks), not args["untie_embeddings_and_output_weights"]
    namespace = argparse.Namespace(**{**args, "iteration": iteration})
    tmp, manifest = store.begin(root, iteration), {}
    for r in range(pp):
        for t in range(tp):
            state = {"args": namespace, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}
            for v in range(chunks):
                stage = v * pp + r
                state["model" if chunks == 1 else f"model{v}"] = _chunk_state(
                    full, range(stage * per_chunk, (stage + 1) * per_chunk), stage == 0, stage == pp * chunks - 1,
                    tied, transformer_engine, tp, t, args["swiglu"], dtype)
            rank_dir = f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{r:03d}"
            os.makedirs(os.path.join(tmp, rank_dir))
            fname = f"{rank_dir}/{CHECKPOINT_FILE}"
            manifest[fname] = store.save_file(state, os.path.join(tmp, fname))
    return store.commit(root, iteration, tmp, manifest)


# -- either format -------------------------------------------------------------------------
def read_megatron_checkpoint(path: str) -> dict:
    """The latest checkpoint under a Megatron save directory (or an iteration directory), either
    format: ``{"args", "iteration", "format", "directory", "tensors"}`` (Megatron full state dict)."""
    iteration, directory = find_checkpoint(path)
    fmt = detect_format(directory)
    read = read_torch_dist if fmt == "torch_dist" else read_legacy
    args, saved_iteration, tensors = read(directory)
    return {"args": args, "iteration": saved_iteration or iteration, "format": fmt, "directory": directory,
            "tensors": tensors}


def write_megatron_checkpoint(full: dict, args: dict, root: str, fmt: str, tp: int, pp: int, iteration: int,
                              vpp: int | None = None, transformer_engine: bool = False,
                              dtype: torch.dtype = torch.float32) -> str:
    """Write a Megatron full state dict in format ``fmt`` (torch_dist: any layout loads it; torch:
    one file per TP x PP rank); returns the iteration directory."""
    if fmt == "torch_dist":
        return write_torch_dist(full, args, root, iteration, dtype)
    if fmt != "torch":
        raise ConversionError(f"unknown Megatron checkpoint format {fmt!r}: {' or '.join(FORMATS)}")
    return write_legacy(full, args, root, tp, pp, iteration, vpp, transformer_engine, dtype)
