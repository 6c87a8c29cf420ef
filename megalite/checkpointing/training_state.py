"""Save and load the training state: atomic, verified, and loadable at any TP/PP/DP layout.

Files of ``DIR/iter_0000010/`` (written through the protocol of :mod:`.store`)::

    common.pt                  the trainer's counters, LR scheduler, loss scaler, Adam step,
                               config, source layout
    model_tp00_pp00.pt         per (tp, pp) position, written by its DP rank 0: params, fp32 main
                               params and Adam moments of that position, full along DP, keyed by
                               global name with TP shard metadata (see :mod:`.format`)
    rng_rank00000.pt           per rank: python, numpy, torch, TP-tracker RNG

This module only composes the parts' own ``state_dict()`` / ``load_state_dict()``: the
trainer's counters, the LR scheduler, the optimizer (its fragments by global name, the loss
scaler, Adam's step), the model-parallel RNG tracker.
"""
from __future__ import annotations

import dataclasses
import os
import random
import warnings

import numpy as np
import torch
import torch.distributed as dist

from ..model import named_global_parameters
from . import store
from .format import assemble, shard_for, shard_meta

MODEL_FIELDS_THAT_MUST_MATCH = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                "num_query_groups", "position_embedding_type", "normalization", "swiglu",
                                "disable_bias_linear", "untie_embeddings_and_output_weights", "openai_gelu")
MODEL_FIELD_DEFAULTS = {"openai_gelu": False}  # fields added after older checkpoints were written
OPTIMIZER_KEYS = ("main", "exp_avg", "exp_avg_sq")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _layout(trainer) -> dict:
    ps = trainer.pstate
    return {"tp": ps.tp_size, "pp": ps.pp_size, "dp": ps.dp_size, "cp": ps.cp_size, "world": ps.world_size,
            "chunks": len(trainer.model), "distributed_optimizer": trainer.optimizer.distributed}


def _optimizer_state_by_param(trainer) -> dict[str, dict[str, torch.Tensor]]:
    """Main params and Adam moments of every param of this rank, whole along DP: with the
    distributed optimizer each rank fills its fragments and a sum over DP completes them."""
    params = dict(named_global_parameters(trainer.model))
    offsets, total = {}, 0
    for name, p in params.items():
        offsets[name] = total
        total += p.numel()
    flat = {k: torch.zeros(total, dtype=torch.float32, device=trainer.device) for k in OPTIMIZER_KEYS}
    for name, piece in trainer.optimizer.state_dict()["fragments"].items():
        start, end = offsets[name] + piece["start"], offsets[name] + piece["end"]
        for key in OPTIMIZER_KEYS:
            if key in piece:
                flat[key][start:end] = piece[key].reshape(-1)
    if trainer.optimizer.distributed:
        for tensor in flat.values():
            dist.all_reduce(tensor, group=trainer.pstate.dp_cp_group)
    return {name: {k: flat[k][offsets[name]:offsets[name] + p.numel()].view_as(p).cpu().clone()
                   for k in OPTIMIZER_KEYS} for name, p in params.items()}


def _rng_state(trainer) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": trainer.tracker.state_dict()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _common_state(trainer) -> dict:
    optimizer = trainer.optimizer.state_dict()
    return {**trainer.state_dict(), "scheduler": trainer.scheduler.state_dict(), "scaler": optimizer["scaler"],
            "adam_step": optimizer["step"], "config": dataclasses.asdict(trainer.cfg), "layout": _layout(trainer)}


def save_checkpoint(trainer, root: str, keep_last: int | None = None, log=print) -> str:
    """Write the full training state of iteration ``trainer.iteration`` under ``root`` (collective)."""
    ps, it = trainer.pstate, trainer.iteration
    if ps.rank == 0:
        store.begin(root, it)
    _barrier()
    tmp = store.temp_dir(root, it)
    optimizer_state = _optimizer_state_by_param(trainer)
    entries = {}
    if ps.dp_cp_rank == 0:
        tensors = {name: {"tensor": p.detach().cpu(), **shard_meta(p, ps.tp_rank, ps.tp_size), **optimizer_state[name]}
                   for name, p in named_global_parameters(trainer.model)}
        fname = f"model_tp{ps.tp_rank:02d}_pp{ps.pp_rank:02d}.pt"
        entries[fname] = store.save_file(tensors, os.path.join(tmp, fname))
    fname = f"rng_rank{ps.rank:05d}.pt"
    entries[fname] = store.save_file(_rng_state(trainer), os.path.join(tmp, fname))
    gathered = [entries]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, entries)
    final = store.iteration_dir(root, it)
    if ps.rank == 0:
        manifest = {k: v for e in gathered for k, v in e.items()}
        manifest["common.pt"] = store.save_file(_common_state(trainer), os.path.join(tmp, "common.pt"))
        store.commit(root, it, tmp, manifest, keep_last)
        log(f"> saved checkpoint at iteration {it} to {final}")
    _barrier()
    return final


def _check_model_config(saved: dict, cfg, directory: str) -> None:
    saved_model = {**MODEL_FIELD_DEFAULTS, **saved["config"]["model"]}
    diffs = [f"--{k.replace('_', '-')}: checkpoint {saved_model.get(k)!r}, now {getattr(cfg.model, k)!r}"
             for k in MODEL_FIELDS_THAT_MUST_MATCH if saved_model.get(k) != getattr(cfg.model, k)]
    if diffs:
        raise ValueError(f"checkpoint {directory} was saved with a different model: " + "; ".join(diffs))


def load_checkpoint(trainer, root: str, finetune: bool = False, load_optim: bool = True,
                    load_rng: bool = True, log=print) -> bool:
    """Restore the latest checkpoint under ``root`` into ``trainer`` (any layout); False if none."""
    latest = store.open_latest(root)
    if latest is None:
        log(f"> no checkpoint found in {root}: starting from scratch")
        return False
    it, directory, manifest = latest
    common = store.load_verified(directory, manifest, "common.pt")
    _check_model_config(common, trainer.cfg, directory)
    ps, src = trainer.pstate, common["layout"]
    same_split = (src["tp"], src["pp"], src["chunks"]) == (ps.tp_size, ps.pp_size, len(trainer.model))
    files = ([f"model_tp{ps.tp_rank:02d}_pp{ps.pp_rank:02d}.pt"] if same_split
             else sorted(k for k in manifest if k.startswith("model_")))
    pieces: dict[str, list[dict]] = {}
    for fname in files:
        for name, item in store.load_verified(directory, manifest, fname).items():
            pieces.setdefault(name, []).append(item)
    with_optim = load_optim and not finetune
    if with_optim and any("exp_avg" not in x for items in pieces.values() for x in items):
        raise ValueError(f"checkpoint {directory} holds no optimizer state (e.g. converted from Hugging Face): "
                         "load it with --finetune or --no-load-optim")
    _restore_tensors(trainer, pieces, directory, common if with_optim else None)
    if not finetune:
        trainer.load_state_dict(common)
        trainer.scheduler.load_state_dict(common["scheduler"])
    if load_rng and not finetune:
        _maybe_restore_rng(trainer, directory, manifest, src, log)
    log(f"> loaded checkpoint {directory} (iteration {it}, saved at TP {src['tp']} PP {src['pp']} "
        f"DP {src['dp']}{'' if same_split else '; resharded'})")
    return True


def _restore_tensors(trainer, pieces: dict, directory: str, common: dict | None) -> None:
    """Params from ``pieces`` (any TP layout); with ``common``, the optimizer state too, cut to the
    fragments this rank updates; else fp32 main params from the params and a fresh Adam."""
    ps, local = trainer.pstate, {}
    for name, p in named_global_parameters(trainer.model):
        if name not in pieces:
            raise KeyError(f"checkpoint {directory} has no tensor {name!r}")
        keys = ("tensor",) + (OPTIMIZER_KEYS if common is not None else ())
        local[name] = {k: _local_tensor(pieces[name], k, p, ps.tp_rank, ps.tp_size) for k in keys}
        with torch.no_grad():
            p.copy_(local[name]["tensor"])
    if common is None:
        trainer.optimizer.reload_main_params()
        return
    fragments = {name: {"start": start, "end": end, **{k: local[name][k].reshape(-1)[start:end] for k in OPTIMIZER_KEYS}}
                 for name, (start, end) in trainer.optimizer.fragment_ranges().items()}
    trainer.optimizer.load_state_dict({"step": common["adam_step"], "scaler": common["scaler"],
                                       "fragments": fragments})


def _local_tensor(pieces: list[dict], key: str, param, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's slice of ``key`` (params, main params or a moment) of one parameter: the saved
    piece itself when the checkpoint has the same TP layout, else cut from the full tensor."""
    same = [x for x in pieces if x["tp_size"] == tp_size and x["tp_rank"] == tp_rank]
    if same and tuple(same[0][key].shape) == tuple(param.shape):
        return same[0][key]
    return shard_for(assemble([{**x, "tensor": x[key]} for x in pieces]), param, tp_rank, tp_size)


def _maybe_restore_rng(trainer, directory: str, manifest: dict, src: dict, log) -> None:
    ps = trainer.pstate
    if not any(name.startswith("rng_") for name in manifest):  # e.g. converted from Hugging Face
        if ps.rank == 0:
            log(f"> checkpoint {directory} holds no RNG states: not restored")
    elif (src["world"], src["tp"], src["pp"], src["dp"], src["cp"]) == \
            (ps.world_size, ps.tp_size, ps.pp_size, ps.dp_size, ps.cp_size):
        state = store.load_verified(directory, manifest, f"rng_rank{ps.rank:05d}.pt")
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        trainer.tracker.load_state_dict(state["tracker"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    elif ps.rank == 0:
        warnings.warn(f"checkpoint layout {src} differs from this run's: per-rank RNG states are not "
                      "restored, so dropout masks will differ from an uninterrupted run", stacklevel=3)
