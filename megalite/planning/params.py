"""Parameter counts per pipeline rank, and the bytes of weights, grads and optimizer state.

* :func:`stage_params`: exact parameter counts of one pipeline rank (per TP shard): padded
  vocabulary, the embedding on the first stage and its tied copy on the last, biases, norms.
* :func:`state_bytes`: weights, grads, fp32 main params and Adam state (Megatron's table:
  18 B/param for bf16, 6 + 12/DP with the distributed optimizer; 16 and 8 + 8/DP for fp32).
"""
from __future__ import annotations

import copy
import math

from ..config import Config
from ..model import stage_layer_ranges
from ..tensor_parallel.layers import pad_vocab_size


# -- parameters -----------------------------------------------------------------------------
def padded_vocab(cfg: Config, vocab_size: int) -> int:
    return pad_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size)


def _norm_params(m) -> int:
    return 2 * m.hidden_size if m.normalization == "LayerNorm" else m.hidden_size


def layer_params(m, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank."""
    h, d = m.hidden_size, m.hidden_size // m.num_attention_heads
    bias = not m.disable_bias_linear
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * d
    parts = 2 if m.swiglu else 1
    count = 2 * _norm_params(m)
    count += qkv * h // tp + (qkv // tp if bias else 0)                       # column-parallel QKV
    count += h * m.num_attention_heads * d // tp + (h if bias else 0)          # row-parallel proj (bias replicated)
    count += parts * m.ffn_hidden_size * h // tp + (parts * m.ffn_hidden_size // tp if bias else 0)
    count += h * m.ffn_hidden_size // tp + (h if bias else 0)
    return count


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
              "layers": sum(end - start for start, end in ranges) * layer_params(m, tp),
              "final_norm": _norm_params(m) if last else 0,
              # the output layer: its own weight when untied; the tied copy on a last stage that
              # is not also the first (with PP=1 the one embedding serves both)
              "output_layer": vocab_rows if last and (not tied or not first) else 0}
    counts["total"] = sum(counts.values())
    return counts


def total_params(cfg: Config, vocab_size: int) -> int:
    """Parameters of the whole model (vocabulary padded as for this TP size), a tied
    embedding counted once."""
    whole = copy.deepcopy(cfg)
    whole.parallel.tensor_model_parallel_size, whole.parallel.pipeline_model_parallel_size = 1, 1
    whole.parallel.num_layers_per_virtual_pipeline_stage = None
    return stage_params(whole, vocab_size, 0, padded_vocab(cfg, vocab_size))["total"]


# -- weights, grads, optimizer --------------------------------------------------------------
def state_bytes(num_params: int, cfg: Config) -> dict[str, float]:
    """Bytes of a rank holding ``num_params`` params: weights, grads, main params, Adam state.

    Grads are fp32 (the grad buffer); with bf16/fp16 the optimizer keeps fp32 main params.
    The distributed optimizer shards main params and Adam over the ``dp x cp`` ranks (each
    holds ``ceil(P / DP)`` elements of the padded buffer).
    """
    t, p = cfg.training, cfg.parallel
    half = t.bf16 or t.fp16
    dp = cfg.data_parallel_size * p.context_parallel_size
    shard = math.ceil(num_params / dp) if p.use_distributed_optimizer and dp > 1 else num_params
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
