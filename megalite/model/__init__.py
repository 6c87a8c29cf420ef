"""GPT model: transformer blocks built from tensor-parallel layers, split into pipeline stages."""
from __future__ import annotations

import re

from ..config import Config
from ..parallel_state import ParallelState
from ..tensor_parallel.random import RNGStatesTracker
from .gpt import GPTModel
from .transformer import Attention, MLP, TransformerLayer


def stage_layer_ranges(num_layers: int, pp_size: int, pp_rank: int,
                       layers_per_virtual_stage: int | None = None) -> list[tuple[int, int]]:
    """``[start, end)`` of the layers each model chunk of pipeline rank ``pp_rank`` holds.

    Without virtual stages there is one chunk of ``num_layers / pp_size`` layers. With
    ``layers_per_virtual_stage`` = L, chunk v of rank r is virtual stage ``v * pp_size + r``
    and holds layers ``[(v*pp + r) * L, (v*pp + r + 1) * L)`` (Megatron's interleaving).
    """
    if num_layers % pp_size:
        raise ValueError(f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size {pp_size}")
    per_stage = num_layers // pp_size
    size = layers_per_virtual_stage or per_stage
    if per_stage % size:
        raise ValueError(f"{per_stage} layers per pipeline stage are not divisible by "
                         f"--num-layers-per-virtual-pipeline-stage {size}")
    chunks = per_stage // size
    return [((v * pp_size + pp_rank) * size, (v * pp_size + pp_rank + 1) * size) for v in range(chunks)]


LAYER_RE = re.compile(r"^layers\.(\d+)\.(.*)$")
EXPERT_RE = re.compile(r"^(mlp\.experts\.)(\d+)\.(.*)$")


def global_name(chunk, local_name: str) -> str:
    """``layers.3.mlp.fc1.weight`` of a chunk starting at layer 4 -> ``layers.7.mlp.fc1.weight``:
    parameter names in the whole model, the same at every TP / PP / VPP / EP layout (local
    expert ``j`` of expert-parallel rank ``r`` is expert ``r * E / EP + j``)."""
    m = LAYER_RE.match(local_name)
    if not m:
        return local_name
    rest = m.group(2)
    expert = EXPERT_RE.match(rest)
    if expert:
        rest = f"{expert.group(1)}{chunk.expert_offset + int(expert.group(2))}.{expert.group(3)}"
    return f"layers.{chunk.layer_start + int(m.group(1))}.{rest}"


def named_global_parameters(model_chunks):
    """``(global name, param)`` of every parameter of this rank's chunks. The last stage's copy
    of a tied embedding is included, under the same name as the first stage's."""
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            yield global_name(chunk, name), p


def build_model(cfg: Config, pstate: ParallelState, vocab_size: int,
                tracker: RNGStatesTracker | None = None) -> list[GPTModel]:
    """The model chunks this rank holds (one, or several with virtual pipeline stages)."""
    ranges = stage_layer_ranges(cfg.model.num_layers, pstate.pp_size, pstate.pp_rank,
                                cfg.parallel.num_layers_per_virtual_pipeline_stage)
    chunks = []
    for v, (start, end) in enumerate(ranges):
        vp_rank = v if len(ranges) > 1 else None
        chunks.append(GPTModel(cfg.model, pstate, vocab_size=vocab_size, seed=cfg.training.seed,
                               tracker=tracker, sequence_parallel=cfg.parallel.sequence_parallel,
                               pre_process=pstate.is_pipeline_first_stage(vp_rank),
                               post_process=pstate.is_pipeline_last_stage(vp_rank),
                               layer_start=start, layer_end=end))
    return chunks


__all__ = ["GPTModel", "TransformerLayer", "Attention", "MLP", "build_model", "stage_layer_ranges", "global_name",
           "named_global_parameters"]
