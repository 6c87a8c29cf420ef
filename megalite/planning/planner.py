"""The plan of a run: memory per pipeline rank, communication, pipeline bubble and a simple
step-time model (:func:`plan`), and the layouts of a world size that fit (:func:`search`)."""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

from ..config import Config, validate
from .activations import stage_activations
from .comm import communication
from .flops import model_flops_per_iteration
from .hardware import GiB, Hardware
from .layout import model_chunks, pipeline_bubble
from .params import active_params, padded_vocab, stage_expert_params, stage_params, state_bytes, total_params


@dataclass
class Plan:
    cfg: Config
    vocab_size: int
    padded_vocab_size: int
    total_params: int
    active_params: int = 0                              # MoE: what one token runs (top-k experts)
    stages: list[dict] = field(default_factory=list)   # per pipeline rank
    bubble: float = 0.0                                 # bubble time / ideal compute time
    times: dict = field(default_factory=dict)           # seconds per step by part, and "total"
    device_memory: float = 0.0                          # bytes

    @property
    def peak_memory(self) -> float:
        return max(st["memory"] for st in self.stages)

    @property
    def fits(self) -> bool:
        return self.peak_memory <= self.device_memory


def plan(cfg: Config, vocab_size: int, hw: Hardware | None = None) -> Plan:
    """Memory per pipeline rank, communication, bubble and estimated step time of ``cfg``."""
    hw = hw or Hardware()
    result = Plan(cfg, vocab_size, padded_vocab(cfg, vocab_size), total_params(cfg, vocab_size),
                  active_params(cfg, vocab_size), device_memory=hw.device_memory_gb * GiB)
    result.stages = [_stage(cfg, hw, vocab_size, rank) for rank in range(cfg.parallel.pipeline_model_parallel_size)]
    result.bubble = pipeline_bubble(cfg)
    flops = _step_flops(cfg, result.padded_vocab_size)
    compute = flops / cfg.world_size / (hw.peak_tflops * 1e12 * hw.efficiency)
    comm = {g: max(st["communication"].get(g, {}).get("seconds", 0.0) for st in result.stages)
            for g in ("tp", "pp", "dp", "embedding")}
    if cfg.parallel.overlap_grad_reduce:  # hidden behind the backward pass (about 2/3 of the compute)
        comm["dp"] = max(0.0, comm["dp"] - 2 * compute / 3)
    result.times = {"compute": compute, "bubble": compute * result.bubble, **comm}
    result.times["total"] = sum(result.times.values())
    result.times["flops"] = flops
    return result


def _stage(cfg: Config, hw: Hardware, vocab_size: int, rank: int) -> dict:
    """Parameters, state, activations, communication and memory of pipeline rank ``rank``."""
    params = stage_params(cfg, vocab_size, rank)
    state = state_bytes(params["total"], cfg, stage_expert_params(cfg, rank))
    acts = stage_activations(cfg, hw, vocab_size, rank)
    comm = communication(cfg, hw, vocab_size, params["total"], rank)
    return {"pp_rank": rank, "params": params, "state": state, "activations": acts,
            "communication": comm, "memory": state["total"] + acts["peak"]}


def _step_flops(cfg: Config, padded_vocab_size: int) -> float:
    """FLOPs of one step, recomputation included (the step time's compute)."""
    mdl, pp = cfg.model, cfg.parallel.pipeline_model_parallel_size
    flops = model_flops_per_iteration(mdl, cfg.training.global_batch_size, padded_vocab_size,
                                      layers_per_chunk=mdl.num_layers // pp // model_chunks(cfg))
    if mdl.recompute_granularity == "selective":  # the core attention's forward again
        flops += 4 * cfg.training.global_batch_size * mdl.seq_length ** 2 * mdl.hidden_size * mdl.num_layers
    return flops


def search(cfg: Config, vocab_size: int, hw: Hardware | None = None, include_unfit: bool = False) -> list[Plan]:
    """All layouts (TP, PP, distributed optimizer, recompute; SP on with TP > 1) of
    ``cfg.world_size`` ranks that pass validation, fitting ones first, fastest first."""
    hw = hw or Hardware()
    world = cfg.world_size
    plans = []
    for tp in [d for d in range(1, world + 1) if world % d == 0 and d <= hw.gpus_per_node]:
        for pp in [d for d in range(1, world // tp + 1) if (world // tp) % d == 0]:
            for dist_opt, recompute in itertools.product((False, True), (None, "selective", "full")):
                if dist_opt and world // (tp * pp * cfg.parallel.context_parallel_size) == 1:
                    continue  # nothing to shard
                c = _variant(cfg, tp, pp, dist_opt, recompute)
                try:
                    validate(c)
                except ValueError:
                    continue
                plans.append(plan(c, vocab_size, hw))
    plans = [pl for pl in plans if include_unfit or pl.fits]
    return sorted(plans, key=lambda pl: (not pl.fits, pl.times["total"]))


def _variant(cfg: Config, tp: int, pp: int, dist_opt: bool, recompute: str | None) -> Config:
    """A copy of ``cfg`` with this layout (SP on with TP > 1, no virtual stages), the
    distributed optimizer on or off, and this recompute granularity (full: uniform, 1 layer)."""
    c = copy.deepcopy(cfg)
    c.parallel.tensor_model_parallel_size, c.parallel.pipeline_model_parallel_size = tp, pp
    c.parallel.sequence_parallel = tp > 1
    c.parallel.num_layers_per_virtual_pipeline_stage = None
    c.parallel.use_distributed_optimizer = dist_opt
    c.model.recompute_granularity = recompute
    c.model.recompute_method = "uniform" if recompute == "full" else None
    c.model.recompute_num_layers = 1 if recompute == "full" else None
    return c
