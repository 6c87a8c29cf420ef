"""Activation memory: what each layer, stage and pipeline rank keeps for backward.

:func:`layer_activation_bytes` / :func:`stage_activations` count term by term after
Korthikanti et al. (2022) but for megalite's kernels (see docs/performance.md, "Planner");
:func:`korthikanti_layer_bytes` is the paper's ``sbh(34 + 5as/h)`` family, for reference.
"""
from __future__ import annotations

import math

from ..config import Config
from .hardware import Hardware
from .layout import in_flight_microbatches, local_dims, model_chunks
from .params import padded_vocab


def activation_dtype_bytes(cfg: Config) -> int:
    return 2 if cfg.training.bf16 or cfg.training.fp16 else 4


def layer_activation_bytes(cfg: Config, hw: Hardware, recompute: str | None = "config") -> float:
    """Bytes one transformer layer keeps for backward, per micro-batch and TP rank.

    ``recompute``: None, "selective" or "full" (default: the config's). Terms, with
    ``E = s b h`` elements and ``beta`` bytes per activation element (2 bf16/fp16, 4 fp32):
    norm inputs (RMSNorm also keeps its normalised output), the QKV and fc1 inputs (under SP
    the local sequence shard: the gathered input is re-gathered in backward), the QKV output
    (Q, K, V), RoPE'd Q and K, the attention context, the MLP's hidden activations (2 of width
    ffn for GELU, 4 for SwiGLU) and dropout masks; the core attention keeps only a log-sum-exp
    with fused SDPA, or the ``s x s`` scores (the paper's ``5as/h``) on the math path.
    """
    m = cfg.model
    recompute = m.recompute_granularity if recompute == "config" else recompute
    s, b, h, tp, sp = local_dims(cfg)
    beta = activation_dtype_bytes(cfg)
    mask = beta if hw.device == "cpu" else 1
    E = s * b * h
    if recompute == "full":
        return beta * E / (tp if sp else 1)                     # the layer input only
    rep = 1.0 / tp if sp else 1.0                               # replicated region: sharded by SP
    heads, groups, d = m.num_attention_heads / tp, m.num_query_groups / tp, h // m.num_attention_heads
    total = 2 * _norm_bytes(m, s, b, h, beta) * rep
    if m.hidden_dropout > 0:
        total += 2 * mask * E * rep
    total += 2 * beta * E * rep                                 # QKV and fc1 inputs (SP: the local shard)
    total += beta * s * b * d * heads                           # context = proj input
    total += beta * E * m.ffn_hidden_size / h * (4 if m.swiglu else 2) / tp
    qkv_out = beta * s * b * d * (heads + 2 * groups)           # Q, K, V (views of the QKV output)
    rotated = beta * s * b * d * (heads + groups) if m.position_embedding_type == "rope" else 0
    if recompute != "selective" and hw.device == "cpu" and m.attention_dropout > 0:
        # SDPA's math path (computes in fp32): keeps scaled Q and K copies, V (a view keeping the
        # QKV output alive in fp32 without GQA, else a copy expanded to all heads) and the
        # s x s softmax, dropout mask and dropped probabilities.
        shared_v = beta == 4 and groups == heads
        total += (qkv_out if shared_v else 0) + 4 * s * b * d * heads * (2 if shared_v else 3)
        total += 3 * 4 * heads * s * s * b
    else:
        total += qkv_out + rotated
        if recompute != "selective":
            total += 4 * heads * s * b                          # fused SDPA: fp32 log-sum-exp
    return total


def _norm_bytes(m, s: int, b: int, h: int, beta: int) -> float:
    """LayerNorm keeps its input and mean / rstd; torch's RMSNorm keeps an fp32 copy of its
    input and its fp32 normalised output (8 bytes per element whatever the dtype) and rstd."""
    if m.normalization == "LayerNorm":
        return beta * s * b * h + 2 * beta * s * b
    return 8 * s * b * h + 4 * s * b


def korthikanti_layer_bytes(cfg: Config, recompute: str | None = "config") -> float:
    """The paper's per-layer bytes (16-bit activations, 1-byte masks, materialised scores):
    ``sbh(10 + 24/t + 5as/ht)``, ``sbh(34 + 5as/h)/t`` with SP; selective drops the ``5as/h``
    term; full keeps ``2sbh`` (``/t`` with SP)."""
    m = cfg.model
    recompute = m.recompute_granularity if recompute == "config" else recompute
    s, b, h, t, sp = local_dims(cfg)
    a = m.num_attention_heads
    if recompute == "full":
        return 2 * s * b * h / (t if sp else 1)
    scores = 0 if recompute == "selective" else 5 * a * s / (h * t)
    return s * b * h * ((34 / t if sp else 10 + 24 / t) + scores)


def stage_extra_activation_bytes(cfg: Config, hw: Hardware, vocab_size: int, first: bool, last: bool) -> float:
    """Per micro-batch: the embedding (ids, dropout mask) and the output layer and loss (final
    norm input, logits input, the fp32 softmax of the cross entropy, targets)."""
    m = cfg.model
    s, b, h, tp, sp = local_dims(cfg)
    beta = activation_dtype_bytes(cfg)
    mask = beta if hw.device == "cpu" else 1
    rep = 1.0 / tp if sp else 1.0
    total = 0.0
    if first:  # token ids (and position ids) kept by the embedding lookups
        total += 8 * s * b + (8 * s if m.position_embedding_type == "learned_absolute" else 0)
        total += s * b if tp > 1 else 0                          # vocab-range mask of the lookup
        if m.hidden_dropout > 0:
            total += mask * s * b * h * rep
        elif sp:  # the first norm keeps a view of the whole (unscattered) embedding output alive
            total += beta * s * b * h * (1 - rep)
    if m.position_embedding_type == "rope":  # the cos / sin tables, shared by the layers
        total += 2 * beta * s * (h // m.num_attention_heads)
    if last:
        norm = _norm_bytes(m, s, b, h, beta) * rep
        total += norm + beta * s * b * h * rep + 4 * s * b * padded_vocab(cfg, vocab_size) / tp + 13 * s * b
    return total


def _recompute_split(cfg: Config, layers: int) -> tuple[int, int, int]:
    """``(checkpoint inputs, fully stored layers, layers recomputed at once)`` for a chunk."""
    m = cfg.model
    if m.recompute_granularity != "full":
        return 0, layers, 0
    n = m.recompute_num_layers or 1
    if m.recompute_method == "uniform":
        return math.ceil(layers / n), 0, min(n, layers)
    recomputed = min(n, layers)
    return recomputed, layers - recomputed, 1 if recomputed else 0


def stage_activations(cfg: Config, hw: Hardware, vocab_size: int, pp_rank: int) -> dict[str, float]:
    """Activation bytes of pipeline rank ``pp_rank``: per micro-batch of one chunk, in flight, peak."""
    p = cfg.parallel
    pp = p.pipeline_model_parallel_size
    layers = cfg.model.num_layers // pp // model_chunks(cfg)
    inputs, stored, working = _recompute_split(cfg, layers)
    full_layer = layer_activation_bytes(cfg, hw, recompute=None if cfg.model.recompute_granularity == "full"
                                        else "config")
    per_chunk = inputs * layer_activation_bytes(cfg, hw, "full") + stored * full_layer
    first, last = pp_rank == 0, pp_rank == pp - 1
    in_flight = in_flight_microbatches(cfg, pp_rank)
    first_extras = (stage_extra_activation_bytes(cfg, hw, vocab_size, first, False)
                    * min(in_flight, cfg.num_microbatches))
    peak = in_flight * per_chunk + first_extras + stage_extra_activation_bytes(cfg, hw, vocab_size, False, last)
    working_set = 0.0
    if working:
        # Full recompute: the backward of the oldest micro-batch re-runs ``working`` layers (the
        # first one's input is the stored checkpoint input), after the layers stored in full and
        # the logits are freed; the other in-flight micro-batches stay stored.
        checkpoint_input = layer_activation_bytes(cfg, hw, "full")
        working_set = working * full_layer - checkpoint_input
        peak = max(peak, (in_flight - 1) * per_chunk + first_extras + inputs * checkpoint_input + working_set)
    return {"per_microbatch": per_chunk + stage_extra_activation_bytes(cfg, hw, vocab_size, first, last),
            "in_flight": in_flight, "recompute_working_set": working_set, "peak": peak,
            "korthikanti": in_flight * layers * korthikanti_layer_bytes(cfg)}
