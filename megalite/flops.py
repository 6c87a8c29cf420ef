"""Model FLOPs per iteration (Megatron's formula) for the throughput and MFU in the log line."""
from __future__ import annotations


def num_floating_point_operations(*, batch_size: int, seq_length: int, num_layers: int, hidden_size: int,
                                  num_attention_heads: int, num_query_groups: int, ffn_hidden_size: int,
                                  padded_vocab_size: int, swiglu: bool = False, full_recompute: bool = False) -> float:
    """Forward + backward matmul FLOPs of one iteration over ``batch_size`` sequences.

    ``12 B s L h^2 [ (1 + g/n + s/h) + (ffn/h)(3/2 if SwiGLU) + V / (2 L h) ]``: QKV and output
    projections (K/V scaled by groups g / heads n), attention scores and values (s/h), the MLP,
    and the logits; 12 = 2 (multiply-add) x 3 (forward, two backward matmuls) x 2 (the pairs of
    matrices per term). With ffn = 4h and no GQA this is Narayanan et al.'s
    ``72 B s L h^2 (1 + s/6h + V/12Lh)``; full recompute adds one more forward of the layers.
    """
    gated = 1.5 if swiglu else 1.0
    layers_term = (1 + num_query_groups / num_attention_heads + seq_length / hidden_size) \
        + (ffn_hidden_size / hidden_size) * gated
    logits_term = padded_vocab_size / (2 * num_layers * hidden_size)
    base = 12 * batch_size * seq_length * num_layers * hidden_size * hidden_size
    flops = base * (layers_term + logits_term)
    if full_recompute:  # one extra forward of the transformer layers (a third of fwd+bwd)
        flops += base * layers_term / 3
    return flops
