"""Model FLOPs per iteration (Megatron's formula) for the throughput and MFU in the log line.

The derivation, and how it relates to Narayanan et al.'s ``96 B s l h^2 (1 + s/6h + V/16lh)``,
is in docs/performance.md ("FLOPs and MFU").
"""
from __future__ import annotations

from ..config import moe_layer_pattern


def num_floating_point_operations(*, batch_size: int, seq_length: int, num_layers: int, hidden_size: int,
                                  num_attention_heads: int, num_query_groups: int, ffn_hidden_size: int,
                                  padded_vocab_size: int, swiglu: bool = False, full_recompute: bool = False,
                                  recompute_fraction: float = 1.0, mlp_term: float | None = None) -> float:
    """Forward + backward matmul FLOPs of one iteration over ``batch_size`` sequences.

    ``12 B s L h^2 [ (1 + g/n + s/h) + (ffn/h)(3/2 if SwiGLU) + V / (2 L h) ]``: QKV and output
    projections (K/V scaled by groups g / heads n), attention scores and values (s/h), the MLP,
    and the logits; 12 = 2 (multiply-add) x 3 (forward, two backward matmuls) x 2 (the pairs of
    matrices per term). With ffn = 4h and no GQA this is Narayanan et al.'s
    ``72 B s L h^2 (1 + s/6h + V/12Lh)``; full recompute adds one more forward of the layers
    (of ``recompute_fraction`` of them: ``--recompute-method block`` checkpoints only some),
    which turns it into their ``96 B s L h^2 (1 + s/6h + V/16Lh)``. ``mlp_term`` replaces the
    MLP's ``(ffn/h)(3/2 if SwiGLU)`` (MoE models: the mean over layers of what a token runs).
    """
    gated = 1.5 if swiglu else 1.0
    if mlp_term is None:
        mlp_term = (ffn_hidden_size / hidden_size) * gated
    layers_term = (1 + num_query_groups / num_attention_heads + seq_length / hidden_size) + mlp_term
    logits_term = padded_vocab_size / (2 * num_layers * hidden_size)
    base = 12 * batch_size * seq_length * num_layers * hidden_size * hidden_size
    flops = base * (layers_term + logits_term)
    if full_recompute:  # one extra forward of the transformer layers (a third of fwd+bwd)
        flops += base * layers_term / 3 * recompute_fraction
    return flops


def model_flops_per_iteration(model_cfg, batch_size: int, padded_vocab_size: int,
                              include_recompute: bool = True, layers_per_chunk: int | None = None) -> float:
    """:func:`num_floating_point_operations` for a ``ModelConfig`` (validated: ffn and groups set).

    ``include_recompute=False`` gives the *model* FLOPs (what MFU divides by the peak); with
    full recompute the default also counts the extra forward (the log line's TFLOP/s/GPU).
    """
    m = model_cfg
    fraction = 1.0  # uniform: every layer is recomputed; block: the first n of each model chunk
    if m.recompute_method == "block":
        chunk = layers_per_chunk or m.num_layers
        fraction = min(m.recompute_num_layers or 1, chunk) / chunk
    return num_floating_point_operations(
        batch_size=batch_size, seq_length=m.seq_length, num_layers=m.num_layers, hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups or m.num_attention_heads,
        ffn_hidden_size=m.ffn_hidden_size or 4 * m.hidden_size, padded_vocab_size=padded_vocab_size,
        swiglu=m.swiglu, full_recompute=include_recompute and m.recompute_granularity == "full",
        recompute_fraction=fraction, mlp_term=moe_mlp_term(m))


def moe_mlp_term(m) -> float | None:
    """The MLP term of an MoE model, averaged over its layers (None for a dense model): a token
    runs ``--moe-router-topk`` experts and the shared expert, plus the router (``2 h E`` FLOPs
    per token forward, i.e. ``E / 2h`` in units of the formula's ``ffn / h``)."""
    if not m.num_experts:
        return None
    gated = 1.5 if m.swiglu else 1.0
    dense = (m.ffn_hidden_size or 4 * m.hidden_size) / m.hidden_size * gated
    routed = ((m.moe_ffn_hidden_size or m.ffn_hidden_size) * m.moe_router_topk
              + (m.moe_shared_expert_intermediate_size or 0)) / m.hidden_size * gated
    routed += m.num_experts / (2 * m.hidden_size)
    pattern = moe_layer_pattern(m.moe_layer_freq, m.num_layers)
    return sum(routed if moe else dense for moe in pattern) / m.num_layers
