"""Save and load the training state: sharded, optionally asynchronous, safe, any layout.

:class:`Checkpointer` saves a :class:`~megalite.training.Trainer` in the sharded format of
:mod:`.sharded` through the directory protocol of :mod:`.store`: every rank copies the pieces
it owns and writes them (in a background thread with ``async_save``, while training goes on);
once every rank's file is written and read back, rank 0 writes the index, the common state and
the manifest and commits (tracker last). A crash before the commit leaves the previous
checkpoint in place; at most one save is in flight. :func:`load_checkpoint` reads the sharded
format and the older per-(tp, pp) format alike, into any TP / PP / VPP / DP / CP layout.

This module composes the parts' own ``state_dict()``: the trainer's counters, the LR scheduler,
the optimizer (fragments by global name, loss scaler, Adam step), the RNG tracker.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import warnings

import torch
import torch.distributed as dist

from ..model import named_global_parameters
from . import legacy, sharded, store
from .format import tp_position

MODEL_FIELDS_THAT_MUST_MATCH = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                "num_query_groups", "position_embedding_type", "normalization", "swiglu",
                                "disable_bias_linear", "untie_embeddings_and_output_weights", "openai_gelu",
                                "num_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
MODEL_FIELD_DEFAULTS = {"openai_gelu": False, "num_experts": None, "moe_ffn_hidden_size": None,
                        "moe_shared_expert_intermediate_size": None}  # fields older checkpoints lack


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _all_gather(obj) -> list:
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, obj)
        return everyone
    return [obj]


def _moe_state(trainer) -> dict:
    """Every MoE layer's expert bias (global layer -> values), gathered from all ranks (collective)."""
    if trainer.moe is None or not trainer.cfg.model.moe_router_enable_expert_bias:
        return {}
    merged = {}
    for biases in _all_gather(trainer.moe.state_dict()):
        merged.update({str(layer): values for layer, values in biases.items()})
    return {"moe_expert_bias": merged}


def _common_state(trainer, moe: dict) -> dict:
    ps, optimizer = trainer.pstate, trainer.optimizer
    layout = {"tp": ps.tp_size, "pp": ps.pp_size, "dp": ps.dp_size, "cp": ps.cp_size, "world": ps.world_size,
              "chunks": len(trainer.model), "distributed_optimizer": optimizer.distributed}
    return {"format": sharded.FORMAT, **trainer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
            "scaler": optimizer.scaler.state_dict(), "adam_step": optimizer.num_updates,
            "config": dataclasses.asdict(trainer.cfg), "layout": layout, **moe}


@dataclasses.dataclass
class _Pending:
    """A save whose files are being written: committed by :meth:`Checkpointer.finalize`."""
    iteration: int
    tmp: str
    index: dict
    common: dict | None
    thread: threading.Thread | None
    result: dict  # "entries" (manifest entries of this rank's file) or "error"


class Checkpointer:
    """The saves of one run under ``root`` (keeping the newest ``keep_last``)."""

    def __init__(self, root: str, keep_last: int | None = None, async_save: bool = False, log=print,
                 device=torch.device("cpu")):
        self.root, self.keep_last, self.async_save, self.log = root, keep_last, async_save, log
        self.device = device  # of the "done" flag the ranks all-reduce (NCCL reduces device tensors only)
        self.pending: _Pending | None = None
        self.saved_iteration = store.read_tracker(root) if os.path.isdir(root) else None  # started or committed

    def save(self, trainer) -> None:
        """Start saving ``trainer`` at its iteration (collective). Synchronous saves are
        committed before this returns; asynchronous ones by a later :meth:`poll` / :meth:`finalize`."""
        self.finalize()  # at most one save in flight
        ps, it = trainer.pstate, trainer.iteration
        self.saved_iteration = it
        tensors, index = sharded.snapshot(trainer)  # copies: training may go on
        moe = _moe_state(trainer)
        rng = sharded.rng_state(trainer)
        if ps.rank == 0:
            store.begin(self.root, it)
        _barrier()
        common = _common_state(trainer, moe) if ps.rank == 0 else None
        pending = _Pending(it, store.temp_dir(self.root, it), index, common, None, {})

        def write():
            try:
                pending.result["entries"] = sharded.write_shard(pending.tmp, ps.rank, tensors, rng)
            except Exception as e:  # noqa: BLE001 - reported to every rank by finalize
                pending.result["error"] = f"rank {ps.rank}: {type(e).__name__}: {e}"
        self.pending = pending
        if self.async_save:
            pending.thread = threading.Thread(target=write, name=f"megalite-save-{it}", daemon=True)
            pending.thread.start()
        else:
            write()
            self.finalize()

    def poll(self) -> None:
        """Commit the save in flight if every rank has written its file (collective while a
        save is in flight: one all-reduce; call it on every rank each iteration)."""
        if self.pending is None:
            return
        done = torch.tensor([float(self.pending.thread is None or not self.pending.thread.is_alive())],
                            device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done.item() == 1.0:
            self.finalize()

    def finalize(self) -> None:
        """Wait for the save in flight and commit it (collective)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        if pending.thread is not None:
            pending.thread.join()
        gathered = _all_gather((pending.result, pending.index))
        errors = [result["error"] for result, _ in gathered if "error" in result]
        if errors:
            raise RuntimeError(f"checkpoint of iteration {pending.iteration} not saved: " + "; ".join(errors))
        if dist.is_initialized() and dist.get_rank() != 0:
            _barrier()
            return
        manifest = {k: v for result, _ in gathered for k, v in result["entries"].items()}
        index: dict[str, list] = {}
        for _, rank_index in gathered:
            for name, entries in rank_index.items():
                index.setdefault(name, []).extend(entries)
        manifest["index.json"] = sharded.write_json(index, os.path.join(pending.tmp, "index.json"))
        manifest["common.json"] = sharded.write_json(pending.common, os.path.join(pending.tmp, "common.json"))
        final = store.commit(self.root, pending.iteration, pending.tmp, manifest, self.keep_last)
        self.log(f"> saved checkpoint at iteration {pending.iteration} to {final}")
        _barrier()


def save_checkpoint(trainer, root: str, keep_last: int | None = None, log=print) -> str:
    """Save ``trainer`` under ``root`` now (collective, synchronous); returns the directory."""
    Checkpointer(root, keep_last, log=log).save(trainer)
    return store.iteration_dir(root, trainer.iteration)


# -- loading -----------------------------------------------------------------------------
def _check_model_config(saved: dict, cfg, directory: str) -> None:
    saved_model = {**MODEL_FIELD_DEFAULTS, **saved["config"]["model"]}
    diffs = [f"--{k.replace('_', '-')}: checkpoint {saved_model.get(k)!r}, now {getattr(cfg.model, k)!r}"
             for k in MODEL_FIELDS_THAT_MUST_MATCH if saved_model.get(k) != getattr(cfg.model, k)]
    if diffs:
        raise ValueError(f"checkpoint {directory} was saved with a different model: " + "; ".join(diffs))


def open_checkpoint(root: str, trainer=None):
    """``(iteration, directory, manifest, common state, reader)`` of the latest checkpoint under
    ``root`` (either format), or None when there is none."""
    latest = store.open_latest(root)
    if latest is None:
        return None
    it, directory, manifest = latest
    if legacy.is_legacy(manifest):
        common = legacy.common_state(directory, manifest)
        ps, src = trainer.pstate, common["layout"]
        same_split = (src["tp"], src["pp"], src["chunks"]) == (ps.tp_size, ps.pp_size, len(trainer.model))
        return it, directory, manifest, common, legacy.LegacyReader(directory, manifest, ps.tp_rank, ps.pp_rank,
                                                                    same_split)
    return it, directory, manifest, store.load_json(directory, manifest, "common.json"), \
        sharded.ShardReader(directory, manifest)


def load_checkpoint(trainer, root: str, finetune: bool = False, load_optim: bool = True,
                    load_rng: bool = True, log=print) -> bool:
    """Restore the latest checkpoint under ``root`` into ``trainer`` (any layout); False if none."""
    opened = open_checkpoint(root, trainer)
    if opened is None:
        log(f"> no checkpoint found in {root}: starting from scratch")
        return False
    it, directory, manifest, common, reader = opened
    _check_model_config(common, trainer.cfg, directory)
    with_optim = load_optim and not finetune
    first = next(name for name, _ in named_global_parameters(trainer.model))
    if with_optim and not reader.has(first, "exp_avg"):
        raise ValueError(f"checkpoint {directory} holds no optimizer state (e.g. converted from Hugging Face): "
                         "load it with --finetune or --no-load-optim")
    _restore_tensors(trainer, reader, common if with_optim else None)
    if not finetune:
        trainer.load_state_dict(common)
        trainer.scheduler.load_state_dict(common["scheduler"])
        if trainer.moe is not None:
            trainer.moe.load_state_dict(common.get("moe_expert_bias", {}))
    if load_rng and not finetune:
        _maybe_restore_rng(trainer, directory, manifest, common, reader, log)
    src = common["layout"]
    resharded = (src["tp"], src["pp"], src["chunks"]) != (trainer.pstate.tp_size, trainer.pstate.pp_size,
                                                          len(trainer.model))
    log(f"> loaded checkpoint {directory} (iteration {it}, saved at TP {src['tp']} PP {src['pp']} "
        f"DP {src['dp']}{'; resharded' if resharded else ''})")
    return True


def _restore_tensors(trainer, reader, common: dict | None) -> None:
    """Params (any TP layout); with ``common``, the optimizer state too, cut to the fragments this
    rank updates; else fp32 main params from the params and a fresh Adam."""
    ps = trainer.pstate
    params = dict(named_global_parameters(trainer.model))
    for name, p in params.items():
        with torch.no_grad():
            p.copy_(reader.local(name, "param", p, *tp_position(p, ps), 0, p.numel()).view_as(p))
    if common is None:
        trainer.optimizer.reload_main_params()
        return
    fragments = {}
    for name, (start, end) in trainer.optimizer.fragment_ranges().items():
        p, main = params[name], "main" if reader.has(name, "main") else "param"
        tp = tp_position(p, ps)
        fragments[name] = {"start": start, "end": end, "main": reader.local(name, main, p, *tp, start, end).float(),
                           **{k: reader.local(name, k, p, *tp, start, end) for k in ("exp_avg", "exp_avg_sq")}}
    trainer.optimizer.load_state_dict({"step": common["adam_step"], "scaler": common["scaler"],
                                       "fragments": fragments})


def _maybe_restore_rng(trainer, directory: str, manifest: dict, common: dict, reader, log) -> None:
    ps, src = trainer.pstate, common["layout"]
    has_rng = (any(name.startswith("rng_") for name in manifest) if isinstance(reader, legacy.LegacyReader)
               else common.get("has_rng", True))
    if not has_rng:  # e.g. converted from Hugging Face
        if ps.rank == 0:
            log(f"> checkpoint {directory} holds no RNG states: not restored")
    elif (src["world"], src["tp"], src["pp"], src["dp"], src["cp"]) == \
            (ps.world_size, ps.tp_size, ps.pp_size, ps.dp_size, ps.cp_size):
        state = reader.rng(ps.rank)
        (legacy.set_rng_state if isinstance(reader, legacy.LegacyReader) else sharded.set_rng_state)(trainer, state)
    elif ps.rank == 0:
        warnings.warn(f"checkpoint layout {src} differs from this run's: per-rank RNG states are not "
                      "restored, so dropout masks will differ from an uninterrupted run", stacklevel=3)
