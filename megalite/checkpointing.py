"""Save and load training state: atomic, verified, and loadable at any TP/PP/DP layout.

Layout on disk (``--save DIR``)::

    DIR/latest_checkpointed_iteration.txt      iteration number, written last
    DIR/iter_0000010/common.pt                 iteration, consumed samples, LR scheduler, loss
                                               scaler, Adam step, config, source layout
    DIR/iter_0000010/model_tp00_pp00.pt        per (tp, pp) position, written by its DP rank 0:
                                               params, fp32 main params and Adam moments of
                                               that position, full along DP, keyed by global
                                               name (see checkpoint_format.py)
    DIR/iter_0000010/rng_rank00000.pt          per rank: python, numpy, torch, TP-tracker RNG
    DIR/iter_0000010/manifest.json             bytes and sha256 of every file

All ranks write into ``DIR/.iter_0000010.tmp``; after a barrier rank 0 writes the manifest,
fsyncs, renames the directory into place and finally rewrites the tracker (temp + rename),
so a crash at any point leaves the previous checkpoint loadable. Loading verifies each file
against the manifest before reading it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import warnings

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint_format import (assemble, fsync_dir, global_name, named_global_params, save_file,
                                shard_for, shard_meta, verify_file)

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FIELDS_THAT_MUST_MATCH = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                "num_query_groups", "position_embedding_type", "normalization", "swiglu",
                                "disable_bias_linear", "untie_embeddings_and_output_weights", "openai_gelu")
MODEL_FIELD_DEFAULTS = {"openai_gelu": False}  # fields added after older checkpoints were written


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> int | None:
    """The latest complete checkpoint's iteration in ``root``, or None when there is none."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _layout(trainer) -> dict:
    ps = trainer.pstate
    return {"tp": ps.tp_size, "pp": ps.pp_size, "dp": ps.dp_size, "cp": ps.cp_size, "world": ps.world_size,
            "chunks": len(trainer.model), "distributed_optimizer": trainer.optimizer.distributed}


def _full_optimizer_state(trainer) -> dict[str, torch.Tensor]:
    """Adam moments (and fp32 main params) as flat buffers covering every parameter of this rank:
    with the distributed optimizer each rank fills its shard and a sum over DP completes them."""
    opt, buf = trainer.optimizer, trainer.buffer
    flat = {k: torch.zeros(buf.numel, dtype=torch.float32, device=buf.grad_data.device)
            for k in ("exp_avg", "exp_avg_sq", "main")}
    for f in opt.fragments:
        state = opt.optimizer.state.get(f.main, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                flat[key][f.start:f.end] = state[key]
        flat["main"][f.start:f.end] = f.main.float()
    if opt.distributed:
        for tensor in flat.values():
            dist.all_reduce(tensor, group=trainer.pstate.dp_cp_group)
    return flat


def _rng_state(trainer) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": trainer.tracker.get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(trainer, root: str, keep_last: int | None = None, log=print) -> str:
    """Write the full training state of iteration ``trainer.iteration`` under ``root`` (collective)."""
    ps, it = trainer.pstate, trainer.iteration
    final, tmp = iteration_dir(root, it), os.path.join(root, f".iter_{it:07d}.tmp")
    if ps.rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    flat = _full_optimizer_state(trainer)
    entries = {}
    if ps.dp_cp_rank == 0:
        tensors = {}
        for name, p in named_global_params(trainer.model):
            start, end = trainer.buffer.param_range[id(p)]
            item = {"tensor": p.detach().cpu(), **shard_meta(p, ps.tp_rank, ps.tp_size)}
            for key in ("exp_avg", "exp_avg_sq", "main"):
                item[key] = flat[key][start:end].view_as(p).cpu().clone()
            tensors[name] = item
        fname = f"model_tp{ps.tp_rank:02d}_pp{ps.pp_rank:02d}.pt"
        entries[fname] = save_file(tensors, os.path.join(tmp, fname))
    fname = f"rng_rank{ps.rank:05d}.pt"
    entries[fname] = save_file(_rng_state(trainer), os.path.join(tmp, fname))
    gathered = [entries]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, entries)
    if ps.rank == 0:
        common = {"iteration": it, "consumed_samples": trainer.consumed_samples,
                  "consumed_valid_samples": trainer.consumed_valid_samples,
                  "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.optimizer.scaler.state_dict(),
                  "adam_step": trainer.optimizer.num_updates, "skipped_iterations": trainer.skipped_iterations,
                  "config": dataclasses.asdict(trainer.cfg), "layout": _layout(trainer)}
        manifest = {k: v for e in gathered for k, v in e.items()}
        manifest["common.pt"] = save_file(common, os.path.join(tmp, "common.pt"))
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if os.path.exists(final):  # re-saving an iteration: move the old one aside first
            shutil.rmtree(final + ".old", ignore_errors=True)
            os.rename(final, final + ".old")
        os.rename(tmp, final)
        _write_tracker(root, it)
        shutil.rmtree(final + ".old", ignore_errors=True)
        if keep_last:
            _remove_old(root, keep_last)
        log(f"> saved checkpoint at iteration {it} to {final}")
    _barrier()
    return final


def _write_tracker(root: str, iteration: int) -> None:
    tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, TRACKER))
    fsync_dir(root)


def _remove_old(root: str, keep_last: int) -> None:
    iterations = sorted(int(d[5:]) for d in os.listdir(root) if d.startswith("iter_") and d[5:].isdigit())
    for it in iterations[:-keep_last]:
        shutil.rmtree(iteration_dir(root, it), ignore_errors=True)


def _load_verified(directory: str, manifest: dict, name: str):
    if name not in manifest:
        raise FileNotFoundError(f"checkpoint {directory} has no {name} in its manifest")
    path = os.path.join(directory, name)
    verify_file(path, manifest[name])
    return torch.load(path, map_location="cpu", weights_only=False)


def _check_model_config(saved: dict, cfg, directory: str) -> None:
    saved_model = saved["config"]["model"]
    saved_model = {**MODEL_FIELD_DEFAULTS, **saved_model}
    diffs = [f"--{k.replace('_', '-')}: checkpoint {saved_model.get(k)!r}, now {getattr(cfg.model, k)!r}"
             for k in MODEL_FIELDS_THAT_MUST_MATCH if saved_model.get(k) != getattr(cfg.model, k)]
    if diffs:
        raise ValueError(f"checkpoint {directory} was saved with a different model: " + "; ".join(diffs))


def load_checkpoint(trainer, root: str, finetune: bool = False, load_optim: bool = True,
                    load_rng: bool = True, log=print) -> bool:
    """Restore the latest checkpoint under ``root`` into ``trainer`` (any layout); False if none."""
    it = read_tracker(root)
    if it is None:
        log(f"> no checkpoint found in {root}: starting from scratch")
        return False
    directory = iteration_dir(root, it)
    manifest_path = os.path.join(directory, "manifest.json")
    if not os.path.exists(manifest_path):
        raise FileNotFoundError(f"checkpoint {directory} is incomplete: {manifest_path} is missing")
    with open(manifest_path) as f:
        manifest = json.load(f)
    common = _load_verified(directory, manifest, "common.pt")
    _check_model_config(common, trainer.cfg, directory)
    ps, src = trainer.pstate, common["layout"]
    same_split = (src["tp"], src["pp"], src["chunks"]) == (ps.tp_size, ps.pp_size, len(trainer.model))
    files = ([f"model_tp{ps.tp_rank:02d}_pp{ps.pp_rank:02d}.pt"] if same_split
             else sorted(k for k in manifest if k.startswith("model_")))
    pieces: dict[str, list[dict]] = {}
    for fname in files:
        for name, item in _load_verified(directory, manifest, fname).items():
            pieces.setdefault(name, []).append(item)
    with_optim = load_optim and not finetune
    if with_optim and any("exp_avg" not in x for items in pieces.values() for x in items):
        raise ValueError(f"checkpoint {directory} holds no optimizer state (e.g. converted from Hugging Face): "
                         "load it with --finetune or --no-load-optim")
    _restore_tensors(trainer, pieces, with_optim, common["adam_step"], directory)
    if not finetune:
        trainer.iteration, trainer.consumed_samples = common["iteration"], common["consumed_samples"]
        trainer.consumed_valid_samples = common.get("consumed_valid_samples", 0)
        trainer.skipped_iterations = common.get("skipped_iterations", 0)
        trainer.scheduler.load_state_dict(common["scheduler"])
        if with_optim:
            trainer.optimizer.scaler.load_state_dict(common["scaler"])
            trainer.optimizer.num_updates = common["adam_step"]
    if load_rng and not finetune:
        if not any(name.startswith("rng_") for name in manifest):  # e.g. converted from Hugging Face
            log(f"> checkpoint {directory} holds no RNG states: not restored") if ps.rank == 0 else None
        elif (src["world"], src["tp"], src["pp"], src["dp"], src["cp"]) == \
                (ps.world_size, ps.tp_size, ps.pp_size, ps.dp_size, ps.cp_size):
            _restore_rng(trainer, _load_verified(directory, manifest, f"rng_rank{ps.rank:05d}.pt"))
        elif ps.rank == 0:
            warnings.warn(f"checkpoint layout {src} differs from this run's: per-rank RNG states are not "
                          "restored, so dropout masks will differ from an uninterrupted run", stacklevel=2)
    log(f"> loaded checkpoint {directory} (iteration {it}, saved at TP {src['tp']} PP {src['pp']} "
        f"DP {src['dp']}{'' if same_split else '; resharded'})")
    return True


def _restore_tensors(trainer, pieces: dict, with_optim: bool, adam_step: int, directory: str) -> None:
    ps, opt = trainer.pstate, trainer.optimizer
    local: dict[int, dict[str, torch.Tensor]] = {}
    for chunk in trainer.model:
        for lname, p in chunk.named_parameters():
            name = global_name(chunk, lname)
            if name not in pieces:
                raise KeyError(f"checkpoint {directory} has no tensor {name!r}")
            keys = ("tensor", "main", "exp_avg", "exp_avg_sq") if with_optim else ("tensor",)
            local[id(p)] = {k: _local_tensor(pieces[name], k, p, ps.tp_rank, ps.tp_size) for k in keys}
            with torch.no_grad():
                p.copy_(local[id(p)]["tensor"])
    for f in opt.fragments:
        start = trainer.buffer.param_range[id(f.param)][0]
        state = local[id(f.param)]
        with torch.no_grad():
            source = state["main"] if with_optim else state["tensor"]
            f.main.copy_(source.reshape(-1)[f.start - start:f.end - start])
        if with_optim:
            opt.optimizer.state[f.main] = {
                "step": torch.tensor(float(adam_step), device=f.main.device),  # fused AdamW: on the params' device
                "exp_avg": state["exp_avg"].reshape(-1)[f.start - start:f.end - start].clone().to(f.main.device),
                "exp_avg_sq": state["exp_avg_sq"].reshape(-1)[f.start - start:f.end - start].clone().to(f.main.device)}


def _local_tensor(pieces: list[dict], key: str, param, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's slice of ``key`` (params, main params or a moment) of one parameter: the saved
    piece itself when the checkpoint has the same TP layout, else cut from the full tensor."""
    same = [x for x in pieces if x["tp_size"] == tp_size and x["tp_rank"] == tp_rank]
    if same and tuple(same[0][key].shape) == tuple(param.shape):
        return same[0][key]
    return shard_for(assemble([{**x, "tensor": x[key]} for x in pieces]), param, tp_rank, tp_size)


def _restore_rng(trainer, state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    trainer.tracker.set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
