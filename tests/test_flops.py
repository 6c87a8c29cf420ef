"""megalite/planning/flops.py against a hand count and against torch's FLOP counter on the real model."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megalite.config import parse_args
from megalite.model.gpt import GPTModel
from megalite.parallel_state import ParallelState
from megalite.planning import model_flops_per_iteration, num_floating_point_operations
from megalite.tensor_parallel import model_parallel_seed

B, S, VOCAB = 2, 32, 200
BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", str(S),
        "--micro-batch-size", str(B), "--vocab-size", str(VOCAB), "--mock-data"]


def hand_count(cfg, padded_vocab: int, batch: int) -> int:
    """Matmul FLOPs of one forward + backward, op by op: 2 * m * n * k per matmul, and each
    matmul of the forward appears twice in the backward (input grad and weight grad)."""
    m = cfg.model
    s, h, n, g, f = m.seq_length, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size
    d = h // n
    tokens = batch * s
    per_layer_forward = (
        2 * tokens * h * (n + 2 * g) * d          # QKV projection
        + 2 * batch * n * s * s * d               # scores Q K^T (full s x s: causality is not discounted)
        + 2 * batch * n * s * s * d               # probabilities x V
        + 2 * tokens * n * d * h                  # output projection
        + 2 * tokens * h * f * (2 if m.swiglu else 1)   # fc1 (gate and up with SwiGLU)
        + 2 * tokens * f * h)                     # fc2
    logits_forward = 2 * tokens * h * padded_vocab
    total = 3 * (m.num_layers * per_layer_forward + logits_forward)
    if m.recompute_granularity == "full":
        recomputed = m.num_layers if m.recompute_method == "uniform" else min(m.recompute_num_layers, m.num_layers)
        total += recomputed * per_layer_forward
    return total


def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs):
    b, n, s_q, d = query
    return 4 * b * n * s_q * key[2] * d


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    b, n, s_q, d = query
    return 8 * b * n * s_q * key[2] * d


def measured_flops(cfg) -> tuple[int, int]:
    """FLOPs torch counts for forward + backward of the real model (CPU SDPA registered), and
    the padded vocabulary."""
    model = GPTModel(cfg.model, ParallelState.from_sizes(), vocab_size=VOCAB, tracker=model_parallel_seed(1, 0))
    tokens = torch.randint(0, VOCAB, (B, S))
    ops = torch.ops.aten
    mapping = {ops._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
               ops._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(tokens, labels=tokens).sum().backward()
    return counter.get_total_flops(), model.padded_vocab_size


@pytest.mark.parametrize("extra", [
    [],
    ["--swiglu", "--group-query-attention", "--num-query-groups", "2", "--untie-embeddings-and-output-weights",
     "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--disable-bias-linear"],
    ["--ffn-hidden-size", "96", "--recompute-granularity", "full", "--recompute-method", "uniform"],
    ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1"],
], ids=["gpt", "llama-gqa", "full-uniform", "full-block"])
def test_formula_equals_hand_count_and_flop_counter(extra):
    cfg = parse_args(BASE + extra)
    measured, padded = measured_flops(cfg)
    hand = hand_count(cfg, padded, B)
    formula = model_flops_per_iteration(cfg.model, B, padded)
    assert padded == 256
    assert measured == hand, "the hand count misses or double-counts a matmul"
    assert formula == pytest.approx(hand, rel=1e-12)


def test_model_flops_exclude_recompute():
    cfg = parse_args(BASE + ["--recompute-granularity", "full", "--recompute-method", "uniform"])
    plain = parse_args(BASE)
    assert model_flops_per_iteration(cfg.model, B, 256, include_recompute=False) == \
        model_flops_per_iteration(plain.model, B, 256)
    assert model_flops_per_iteration(cfg.model, B, 256) > model_flops_per_iteration(plain.model, B, 256)


@pytest.mark.parametrize("b,s,L,h,V", [(8, 2048, 24, 2048, 51200), (1, 4096, 96, 12288, 50304), (4, 128, 2, 64, 256)])
def test_narayanan_forms(b, s, L, h, V):
    """ffn = 4h, no GQA: 72 B s L h^2 (1 + s/6h + V/12Lh) without recompute, and Narayanan et
    al.'s 96 B s L h^2 (1 + s/6h + V/16Lh) with full recompute (logits not recomputed)."""
    kw = dict(batch_size=b, seq_length=s, num_layers=L, hidden_size=h, num_attention_heads=16,
              num_query_groups=16, ffn_hidden_size=4 * h, padded_vocab_size=V)
    assert num_floating_point_operations(**kw) == pytest.approx(
        72 * b * s * L * h * h * (1 + s / (6 * h) + V / (12 * L * h)), rel=1e-12)
    assert num_floating_point_operations(**kw, full_recompute=True) == pytest.approx(
        96 * b * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h)), rel=1e-12)


def test_moe_flops_count_the_active_experts_and_the_router():
    """An MoE layer costs top-k experts' MLPs plus the router (``2 h E`` per token forward); with
    top-1 of experts as large as the dense MLP it is the dense model plus the router."""
    from megalite.config import parse_args
    from megalite.planning import model_flops_per_iteration
    base = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]
    dense = parse_args(base).model
    moe = parse_args(base + ["--num-experts", "8", "--moe-router-topk", "1", "--moe-layer-freq", "2"]).model
    tokens = 4 * 32
    router = 3 * 2 * 64 * 8 * tokens * 2  # fwd + 2 bwd matmuls, 2 FLOPs per multiply-add, 2 MoE layers
    assert model_flops_per_iteration(moe, 4, 512) == pytest.approx(model_flops_per_iteration(dense, 4, 512) + router)
    top2 = parse_args(base + ["--num-experts", "8", "--moe-router-topk", "2", "--moe-layer-freq", "2"]).model
    mlp = 3 * 2 * 2 * 64 * 256 * tokens * 2  # one more expert (fc1 + fc2) in each of the 2 MoE layers
    assert model_flops_per_iteration(top2, 4, 512) == pytest.approx(model_flops_per_iteration(moe, 4, 512) + mlp)
