"""Parameter counts per pipeline rank, and the bytes of weights, grads and optimizer state.

* :func:`stage_params`: exact parameter counts of one pipeline rank (per TP shard): padded
  vocabulary, the embedding on the first stage and its tied copy on the last, biases, norms;
  MoE layers with their router, this rank's ``E / EP`` experts (split over expert TP) and the
  shared expert. :func:`total_params` / :func:`active_params`: the whole model, and what one
  token runs through (the top-k experts of each MoE layer, not all of them).
* :func:`state_bytes`: weights, grads, fp32 main params and Adam state (Megatron's table:
  18 B/param for bf16, 6 + 12/DP with the distributed optimizer; 16 and 8 + 8/DP for fp32).
"""
from __future__ import annotations

import copy
import math

from ..config import Config, moe_layer_pattern
from ..model import stage_layer_ranges
from ..tensor_parallel.layers import pad_vocab_size


# -- parameters -----------------------------------------------------------------------------
def padded_vocab(cfg: Config, vocab_size: int) -> int:
    return pad_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size)


def _norm_params(m) -> int:
    return 2 * m.hidden_size if m.normalization == "LayerNorm" else m.hidden_size


def _mlp_params(m, ffn: int, tp: int) -> int:
    """A dense MLP of hidden size ``ffn`` on one TP rank (fc1 column-, fc2 row-parallel)."""
    h, bias, parts = m.hidden_size, not m.disable_bias_linear, 2 if m.swiglu else 1
    return parts * ffn * h // tp + (parts * ffn // tp if bias else 0) + h * ffn // tp + (h if bias else 0)


def layer_params(m, tp: int, moe: bool = False, experts: int | None = None, etp: int = 1) -> int:
    """Parameters of one transformer layer on one TP rank; an MoE layer (``moe``) holds
    ``experts`` experts (default all) of which each is split over ``etp`` ranks."""
    h, d = m.hidden_size, m.hidden_size // m.num_attention_heads
    bias = not m.disable_bias_linear
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * d
    count = 2 * _norm_params(m)
    count += qkv * h // tp + (qkv // tp if bias else 0)                       # column-parallel QKV
    count += h * m.num_attention_heads * d // tp + (h if bias else 0)          # row-parallel proj (bias replicated)
    if not moe:
        return count + _mlp_params(m, m.ffn_hidden_size, tp)
    ffn, parts = m.moe_ffn_hidden_size or m.ffn_hidden_size, 2 if m.swiglu else 1
    count += m.num_experts * h                                                 # router (replicated)
    count += (m.num_experts if experts is None else experts) * (parts + 1) * ffn * h // etp  # bias-free experts
    if m.moe_shared_expert_intermediate_size:
        count += _mlp_params(m, m.moe_shared_expert_intermediate_size, tp)
    return count


def _layers_params(m, p, layers, active: bool = False) -> int:
    """Parameters of the layers ``layers`` (global indices) on one rank; ``active``: the whole
    model's top-k experts instead of the rank's share of all of them."""
    tp = p.tensor_model_parallel_size
    pattern = moe_layer_pattern(m.moe_layer_freq, m.num_layers) if m.num_experts else [0] * m.num_layers
    etp = p.expert_tensor_parallel_size or tp
    experts = m.moe_router_topk if active else (m.num_experts or 0) // p.expert_model_parallel_size
    return sum(layer_params(m, tp, bool(pattern[i]), experts, 1 if active else etp) for i in layers)


def stage_params(cfg: Config, vocab_size: int, pp_rank: int, padded_vocab_size: int | None = None) -> dict[str, int]:
    """Exact parameter counts of pipeline rank ``pp_rank`` (one TP shard), by part."""
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    ranges = stage_layer_ranges(m.num_layers, pp, pp_rank, p.num_layers_per_virtual_pipeline_stage)
    vocab_rows = (padded_vocab_size or padded_vocab(cfg, vocab_size)) // tp * m.hidden_size
    first, last = pp_rank == 0, pp_rank == pp - 1
    tied = not m.untie_embeddings_and_output_weights
    counts = {"embedding": vocab_rows if first else 0,
              "position_embedding": m.max_position_embeddings * m.hidden_size
              if first and m.position_embedding_type == "learned_absolute" else 0,
              "layers": _layers_params(m, p, [i for start, end in ranges for i in range(start, end)]),
              "final_norm": _norm_params(m) if last else 0,
              # the output layer: its own weight when untied; the tied copy on a last stage that
              # is not also the first (with PP=1 the one embedding serves both)
              "output_layer": vocab_rows if last and (not tied or not first) else 0}
    counts["total"] = sum(counts.values())
    return counts


def stage_expert_params(cfg: Config, pp_rank: int) -> int:
    """The MoE expert params of pipeline rank ``pp_rank`` (its EP share, one expert-TP shard):
    the part of :func:`stage_params` whose grads and optimizer state live on the expert-data-
    parallel group."""
    m, p = cfg.model, cfg.parallel
    if not m.num_experts:
        return 0
    ranges = stage_layer_ranges(m.num_layers, p.pipeline_model_parallel_size, pp_rank,
                                p.num_layers_per_virtual_pipeline_stage)
    pattern = moe_layer_pattern(m.moe_layer_freq, m.num_layers)
    moe_layers = sum(pattern[i] for start, end in ranges for i in range(start, end))
    ffn, parts = m.moe_ffn_hidden_size or m.ffn_hidden_size, 2 if m.swiglu else 1
    etp = p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    return moe_layers * m.num_experts // p.expert_model_parallel_size * (parts + 1) * ffn * m.hidden_size // etp


def total_params(cfg: Config, vocab_size: int) -> int:
    """Parameters of the whole model (vocabulary padded as for this TP size), a tied
    embedding counted once."""
    return stage_params(_whole(cfg), vocab_size, 0, padded_vocab(cfg, vocab_size))["total"]


def active_params(cfg: Config, vocab_size: int) -> int:
    """Parameters one token runs through: :func:`total_params` with only ``--moe-router-topk``
    experts of each MoE layer (the same as the total for a dense model)."""
    whole = _whole(cfg)
    counts = stage_params(whole, vocab_size, 0, padded_vocab(cfg, vocab_size))
    m, p = whole.model, whole.parallel
    every_layer = range(m.num_layers)
    return counts["total"] - counts["layers"] + _layers_params(m, p, every_layer, active=bool(m.num_experts))


def _whole(cfg: Config) -> Config:
    """``cfg`` on one rank (TP = PP = EP = ETP = 1, no virtual stages)."""
    whole = copy.deepcopy(cfg)
    p = whole.parallel
    p.tensor_model_parallel_size = p.pipeline_model_parallel_size = p.expert_model_parallel_size = 1
    p.expert_tensor_parallel_size, p.num_layers_per_virtual_pipeline_stage = None, None
    return whole


# -- weights, grads, optimizer --------------------------------------------------------------
def state_bytes(num_params: int, cfg: Config, expert_params: int = 0) -> dict[str, float]:
    """Bytes of a rank holding ``num_params`` params: weights, grads, main params, Adam state.

    Grads are fp32 (the grad buffer); with bf16/fp16 the optimizer keeps fp32 main params.
    The distributed optimizer shards main params and Adam over the ``dp x cp`` ranks (each
    holds ``ceil(P / DP)`` elements of the padded buffer); the ``expert_params`` among them
    (:func:`stage_expert_params`) over the expert-data-parallel ranks instead.
    """
    t, p = cfg.training, cfg.parallel
    half = t.bf16 or t.fp16
    dp = cfg.data_parallel_size * p.context_parallel_size
    etp = p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    edp = cfg.world_size // (etp * p.expert_model_parallel_size * p.pipeline_model_parallel_size)
    dense = num_params - expert_params
    shard = num_params
    if p.use_distributed_optimizer:
        shard = math.ceil(dense / dp) + (math.ceil(expert_params / edp) if expert_params else 0)
    out = {"weights": (2 if half else 4) * num_params, "grads": 4 * num_params,
           "main_params": 4 * shard if half else 0, "optimizer": 8 * shard}
    out["total"] = sum(out.values())
    out["per_param"] = out["total"] / max(num_params, 1)
    return out


def bytes_per_param(cfg: Config) -> float:
    """Megatron's table: 18 / 6 + 12/d (bf16, fp16), 16 / 8 + 8/d (fp32)."""
    t, p = cfg.training, cfg.parallel
    dp = cfg.data_parallel_size * p.context_parallel_size
    fixed, sharded = (6, 12) if t.bf16 or t.fp16 else (8, 8)
    return fixed + sharded / (dp if p.use_distributed_optimizer else 1)
