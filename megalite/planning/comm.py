"""Communication per step and rank: bytes and seconds per group (TP, DP, PP, embedding)."""
from __future__ import annotations

from ..config import Config
from .activations import activation_dtype_bytes
from .hardware import Hardware
from .layout import local_dims, model_chunks
from .params import padded_vocab


def _group_bandwidth(span: int, hw: Hardware) -> float:
    """GB/s of a group whose ranks lie within ``span`` consecutive ranks."""
    return (hw.intra_node_gbps if span <= hw.gpus_per_node else hw.inter_node_gbps) * 1e9


def _activation_message(cfg: Config) -> float:
    """Bytes of one ``s b h`` activation of a micro-batch."""
    s, b, h, _, _ = local_dims(cfg)
    return activation_dtype_bytes(cfg) * s * b * h


def communication(cfg: Config, hw: Hardware, vocab_size: int, params_per_rank: int, pp_rank: int = 0) -> dict:
    """Per step and rank: ``{group: {"ops", "payload", "traffic", "seconds"}}`` (bytes).

    TP, per layer and micro-batch, on ``s b h`` activations: 4 all-reduces (2 forward after the
    row-parallel layers, 2 backward before the column-parallel ones; +2 with full recompute);
    with SP 6 all-gathers and 4 reduce-scatters instead (the backward re-gathers the inputs of
    the column-parallel layers; +2 of each with full recompute); plus the embedding, the logits
    and the cross entropy's three small all-reduces. DP: one all-reduce of the fp32 grads, or a
    reduce-scatter of them and an all-gather of the params with the distributed optimizer.
    PP: one activation forward and one gradient backward per micro-batch and chunk boundary.
    Ring traffic per rank: all-reduce ``2(k-1)/k``, all-gather / reduce-scatter ``(k-1)/k`` of
    the full size.
    """
    out = {}
    if cfg.parallel.tensor_model_parallel_size > 1:
        out["tp"] = _tensor_parallel(cfg, pp_rank)
    if cfg.data_parallel_size * cfg.parallel.context_parallel_size > 1:
        out["dp"] = _data_parallel(cfg, params_per_rank)
    if cfg.parallel.pipeline_model_parallel_size > 1:
        out.update(_pipeline_parallel(cfg, vocab_size, pp_rank))
    for entry in out.values():
        entry["seconds"] = entry["traffic"] / _group_bandwidth(entry.pop("span"), hw)
    return out


def _tensor_parallel(cfg: Config, pp_rank: int) -> dict:
    """The TP group's all-reduces (or SP's all-gathers and reduce-scatters) of a step."""
    m, pp = cfg.model, cfg.parallel.pipeline_model_parallel_size
    s, b, _, tp, sp = local_dims(cfg)
    mb, layers, act = cfg.num_microbatches, m.num_layers // pp, _activation_message(cfg)
    first, last = pp_rank == 0, pp_rank == pp - 1
    full = m.recompute_granularity == "full"
    if sp:  # (all-gathers, reduce-scatters) of act, each (t-1)/t of it per rank
        gathers = layers * (8 if full else 6) + (1 if first else 0) + (2 if last else 0)
        scatters = layers * (6 if full else 4) + (1 if first else 0) + (1 if last else 0)
        halves, ops = gathers + scatters, gathers + scatters
    else:
        reduces = layers * (6 if full else 4) + (1 if first else 0) + (1 if last else 0)
        halves, ops = 2 * reduces, reduces
    small = 3 * 4 * s * b if last else 0  # cross entropy: max, target logit, sum of exp
    ops += 3 if last else 0
    return {"ops": mb * ops, "payload": mb * (ops * act + small),
            "traffic": mb * (halves * act + 2 * small) * (tp - 1) / tp, "span": tp}


def _data_parallel(cfg: Config, params_per_rank: int) -> dict:
    """The DP (x CP) group's grad all-reduce, or reduce-scatter + param all-gather."""
    p, t = cfg.parallel, cfg.training
    dpc = cfg.data_parallel_size * p.context_parallel_size
    grads = 4 * params_per_rank
    if p.use_distributed_optimizer:
        params = (2 if t.bf16 or t.fp16 else 4) * params_per_rank
        entry = {"ops": 2, "payload": grads + params, "traffic": (grads + params) * (dpc - 1) / dpc}
    else:
        entry = {"ops": 1, "payload": grads, "traffic": grads * 2 * (dpc - 1) / dpc}
    entry["span"] = p.tensor_model_parallel_size * dpc
    return entry


def _pipeline_parallel(cfg: Config, vocab_size: int, pp_rank: int) -> dict:
    """``{"pp": sends and receives of activations/grads}``, plus ``"embedding"`` (the tied
    embedding's grad all-reduce) on the first and last stage."""
    m, p = cfg.model, cfg.parallel
    _, _, h, tp, sp = local_dims(cfg)
    pp, chunks = p.pipeline_model_parallel_size, model_chunks(cfg)
    world = tp * p.context_parallel_size * cfg.data_parallel_size * pp
    boundary = _activation_message(cfg) / (tp if sp else 1)
    vstages = [v * pp + pp_rank for v in range(chunks)]
    sends = cfg.num_microbatches * sum((vs < pp * chunks - 1) + (vs > 0) for vs in vstages)
    out = {"pp": {"ops": sends, "payload": sends * boundary, "traffic": sends * boundary, "span": world}}
    if not m.untie_embeddings_and_output_weights and pp_rank in (0, pp - 1):
        emb = 4 * padded_vocab(cfg, vocab_size) // tp * h
        out["embedding"] = {"ops": 1, "payload": emb, "traffic": emb, "span": world}
    return out
