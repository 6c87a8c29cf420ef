"""Model-only megalite checkpoints from and to *full* tensors, for the converters (no training model).

:func:`read_megalite_checkpoint` reassembles the full tensors (TP=1, unpadded) of any layout's
latest checkpoint (either format); :func:`save_megalite_checkpoint` writes full tensors as a
sharded checkpoint of a chosen TP x PP, through the same directory protocol as training
(:mod:`.store`).
"""
from __future__ import annotations

import dataclasses
import os
import types

import torch

from ..config import Config, ModelConfig
from ..model import named_global_parameters, stage_layer_ranges
from ..tensor_parallel import pad_vocab_size
from . import legacy, sharded, store
from .format import assemble, shard_for


def shard_layout(name: str, m: dict, vocab: int) -> dict:
    """How a full tensor is split over TP ranks, from its global name (as the layers set it):
    column-parallel (qkv, fc1: dim 0; fc1 as [gate; up] parts with SwiGLU), row-parallel
    (proj, fc2 weights: dim 1), vocab-parallel embeddings (dim 0, ``real_rows`` = vocab),
    everything else (norms, row-parallel biases, position embeddings) replicated."""
    leaf = name.split(".", 2)[-1] if name.startswith("layers.") else name
    if leaf.startswith("mlp.experts."):  # MoE experts: split like a dense MLP (over expert TP)
        leaf = "mlp." + leaf.split(".", 3)[-1]
    if name in ("word_embeddings.weight", "output_layer.weight"):
        return {"partition_dim": 0, "parts": 1, "real_rows": vocab}
    if leaf in ("attention.qkv.weight", "attention.qkv.bias", "mlp.fc1.weight", "mlp.fc1.bias"):
        return {"partition_dim": 0, "parts": 2 if m["swiglu"] and leaf.startswith("mlp") else 1, "real_rows": None}
    if leaf in ("attention.proj.weight", "mlp.fc2.weight"):
        return {"partition_dim": 1, "parts": 1, "real_rows": None}
    return {"partition_dim": None, "parts": 1, "real_rows": None}


def stage_names(names, m: dict, pp: int, pp_rank: int) -> list[str]:
    """Global names a pipeline stage holds (the last stage of a tied model: the embedding copy)."""
    (start, end), = stage_layer_ranges(m["num_layers"], pp, pp_rank)
    first, last, tied = pp_rank == 0, pp_rank == pp - 1, not m["untie_embeddings_and_output_weights"]
    out = []
    for name in names:
        layer = name.split(".")[1] if name.startswith("layers.") else None
        if layer is not None:
            keep = start <= int(layer) < end
        elif name == "word_embeddings.weight":
            keep = first or (last and tied)
        elif name == "position_embeddings.weight":
            keep = first
        else:  # final_norm, output_layer
            keep = last
        if keep:
            out.append(name)
    return out


def _position_pieces(full: dict, names: list[str], m: dict, vocab: int, padded: int, tp: int, tp_rank: int,
                     fname: str) -> tuple[dict, dict]:
    """The tensors and index entries of one (tp, pp) position: the whole local shard of each of
    ``names`` as one ``param`` piece."""
    tensors, index = {}, {}
    for name in names:
        meta = shard_layout(name, m, vocab)
        sharded_ = meta["partition_dim"] is not None and tp > 1
        rows = (padded // tp if sharded_ else padded) if meta["real_rows"] else None
        fake = types.SimpleNamespace(tensor_model_parallel=sharded_, partition_dim=meta["partition_dim"],
                                     parts=meta["parts"], real_rows=meta["real_rows"],
                                     shape=(rows,) + tuple(full[name].shape[1:]))
        local = shard_for(full[name].float(), fake, tp_rank, tp).contiguous()
        key = f"{name}:param:0"
        tensors[key] = local.reshape(-1).clone()
        index[name] = [{"file": fname, "key": key, "kind": "param", "start": 0, "end": local.numel(),
                        "shape": list(local.shape), "partition_dim": meta["partition_dim"] if sharded_ else None,
                        "parts": meta["parts"], "tp_rank": tp_rank, "tp_size": tp, "real_rows": meta["real_rows"]}]
    return tensors, index


def save_megalite_checkpoint(full: dict, m: dict, vocab: int, root: str, tp: int = 1, pp: int = 1,
                             iteration: int = 0, data: dict | None = None, source: str = "",
                             make_vocab_size_divisible_by: int = 128) -> str:
    """Write ``full`` as a megalite checkpoint of layout TP x PP (no optimizer, no RNG states),
    in the sharded format, one file per (tp, pp) position."""
    model_cfg = ModelConfig(**{**dataclasses.asdict(ModelConfig()), **m, "make_vocab_size_divisible_by":
                               make_vocab_size_divisible_by})
    cfg = Config(model=model_cfg, world_size=tp * pp)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    for key, value in (data or {}).items():
        setattr(cfg.data, key, value)
    if os.path.exists(store.iteration_dir(root, iteration)):
        raise FileExistsError(f"{store.iteration_dir(root, iteration)} exists: convert into an empty --save directory")
    padded = pad_vocab_size(vocab, make_vocab_size_divisible_by, tp)
    tmp, manifest, index = store.begin(root, iteration), {}, {}
    for pp_rank in range(pp):
        names = stage_names(full, m, pp, pp_rank)
        if pp_rank == pp - 1 and pp > 1:  # the last stage's tied-embedding copy: the first stage's is stored
            names = [n for n in names if n != "word_embeddings.weight"]
        for tp_rank in range(tp):
            fname = sharded.shard_file(pp_rank * tp + tp_rank)
            tensors, position_index = _position_pieces(full, names, m, vocab, padded, tp, tp_rank, fname)
            manifest[fname] = store.save_file({"tensors": tensors, "rng": None}, os.path.join(tmp, fname))
            for name, entries in position_index.items():
                index.setdefault(name, []).extend(entries)
    common = {"format": sharded.FORMAT, "iteration": iteration, "consumed_samples": 0, "consumed_valid_samples": 0,
              "scheduler": {"num_steps": 0}, "scaler": None, "adam_step": 0, "skipped_iterations": 0,
              "has_rng": False, "config": dataclasses.asdict(cfg), "converted_from": source,
              "layout": {"tp": tp, "pp": pp, "dp": 1, "cp": 1, "world": tp * pp, "chunks": 1,
                         "distributed_optimizer": False}}
    manifest["index.json"] = sharded.write_json(index, os.path.join(tmp, "index.json"))
    manifest["common.json"] = sharded.write_json(common, os.path.join(tmp, "common.json"))
    return store.commit(root, iteration, tmp, manifest)


def read_megalite_checkpoint(root: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``(full tensors by global name, common state)`` of the latest checkpoint under ``root``,
    whatever its TP/PP layout and format; every file is verified against the manifest and read
    without running code from it."""
    latest = store.open_latest(root)
    if latest is None:
        raise FileNotFoundError(f"no megalite checkpoint in {root}: {os.path.join(root, store.TRACKER)} is missing")
    _, directory, manifest = latest
    if legacy.is_legacy(manifest):
        return _read_legacy(directory, manifest)
    reader = sharded.ShardReader(directory, manifest)
    return ({name: reader.full(name) for name in reader.index},
            store.load_json(directory, manifest, "common.json"))


def _read_legacy(directory: str, manifest: dict) -> tuple[dict[str, torch.Tensor], dict]:
    common = legacy.common_state(directory, manifest)
    swiglu = common["config"]["model"].get("swiglu", False)
    pieces: dict[str, list[dict]] = {}
    for fname in sorted(k for k in manifest if k.startswith("model_")):
        for name, item in store.load_verified(directory, manifest, fname).items():
            item = {k: item[k] for k in ("tensor", "partition_dim", "parts", "tp_rank", "tp_size", "real_rows")}
            if swiglu and name.endswith("mlp.fc1.bias"):  # saved as parts=1 by ColumnParallelLinear, yet
                item["parts"] = 2                          # each TP rank holds [gate_r; up_r] like the weight
            pieces.setdefault(name, []).append(item)
    return {name: assemble(items) for name, items in pieces.items()}, common


def model_config_of(common: dict, **overrides) -> ModelConfig:
    """The ModelConfig saved in a checkpoint's common.pt (fields it lacks keep their defaults)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    saved = {k: v for k, v in common["config"]["model"].items() if k in known}
    return ModelConfig(**{**saved, "use_flash_attn": False, "transformer_impl": "local",
                          "recompute_granularity": None, **overrides})


def load_full_into(chunks, full: dict, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Copy full tensors into model chunks of any TP size (:func:`.format.shard_for`)."""
    for name, p in named_global_parameters(chunks):
        if name not in full:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        with torch.no_grad():
            p.copy_(shard_for(full[name], p, tp_rank, tp_size))


def build_reference_model(model_cfg: ModelConfig, vocab: int, full: dict):
    """A single-process fp32 GPTModel (eval mode) holding ``full``."""
    from ..model.gpt import GPTModel
    from ..parallel_state import single_process_state
    model = GPTModel(model_cfg, single_process_state(), vocab_size=vocab)
    load_full_into([model], full)
    return model.eval()
