"""The serial MoE layer against independent references, and the MoE flags' start-up errors.

The reference routes with megatron-core's own functions (``topk_routing_with_score_function``,
``compute_routing_scores_for_aux_loss``, ``switch_load_balancing_loss_func``, ``z_loss_func``;
megatron-core is a test dependency) and runs the experts as a plain PyTorch loop over
(token, expert) pairs with the same weights: output, every gradient and the logged aux / z
losses must agree.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megalite.config import Config, ModelConfig, fill_defaults, moe_layer_pattern, parse_args
from megalite.model.moe import MoELayer, MoERecorder
from megalite.model.transformer import MLP, ParallelContext
from megalite.parallel_state import ParallelState

mcore = pytest.importorskip("megatron.core.transformer.moe.moe_utils")  # a [test] dependency: installed in CI

VARIANTS = {
    "softmax-aux": {},
    "pre-softmax-seq-aux-swiglu": {"moe_router_pre_softmax": True, "moe_router_load_balancing_type": "seq_aux_loss",
                                   "swiglu": True},
    "sigmoid-top1": {"moe_router_score_function": "sigmoid", "moe_router_topk": 1},
    "sigmoid-expert-bias": {"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True},
    "shared-expert": {"moe_shared_expert_intermediate_size": 24},
}


def build(variant: dict) -> tuple[ModelConfig, MoELayer, MoERecorder]:
    cfg = Config(model=ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=2, num_experts=4,
                                   moe_ffn_hidden_size=24, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01,
                                   init_method_std=0.2, **variant))
    fill_defaults(cfg)
    ctx = ParallelContext(ParallelState.from_sizes(ep=1), None)
    ctx.moe = MoERecorder()
    torch.manual_seed(0)
    shared_size = variant.get("moe_shared_expert_intermediate_size")
    shared = MLP(cfg.model, ctx, shared_size) if shared_size else None
    layer = MoELayer(cfg.model, ctx, 0, shared)
    if layer.router.expert_bias is not None:  # a bias that changes the choice
        layer.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    return cfg.model, layer.train(), ctx.moe


def reference(cfg: ModelConfig, layer: MoELayer, x: torch.Tensor):
    """Output, aux loss and z loss of ``x [s, b, h]`` with megatron-core's routing and losses."""
    s, b, h = x.shape
    tokens = x.reshape(s * b, h)
    logits = tokens @ layer.router.weight.t()
    bias = layer.router.expert_bias
    probs, routing_map = mcore.topk_routing_with_score_function(
        logits, cfg.moe_router_topk, use_pre_softmax=cfg.moe_router_pre_softmax,
        score_function=cfg.moe_router_score_function, expert_bias=bias)
    out = torch.zeros_like(tokens)
    for t in range(s * b):
        for e in routing_map[t].nonzero().flatten().tolist():
            expert = layer.experts[e]
            hidden = tokens[t] @ expert.fc1.weight.t()
            if cfg.swiglu:
                gate, up = hidden.chunk(2)
                hidden = F.silu(gate) * up
            else:
                hidden = F.gelu(hidden)
            out[t] = out[t] + probs[t, e] * (hidden @ expert.fc2.weight.t())
    aux_map, scores = mcore.compute_routing_scores_for_aux_loss(logits, cfg.moe_router_topk,
                                                                cfg.moe_router_score_function)
    E, k = cfg.num_experts, cfg.moe_router_topk
    if cfg.moe_router_load_balancing_type == "seq_aux_loss":  # as megatron-core's _apply_seq_aux_loss
        aux = mcore.switch_load_balancing_loss_func(scores.reshape(s, -1), aux_map.reshape(s, -1).sum(0).float(),
                                                    s, k, E, cfg.moe_aux_loss_coeff) / b
    else:
        aux = mcore.switch_load_balancing_loss_func(scores, aux_map.sum(0).float(), s * b, k, E,
                                                    cfg.moe_aux_loss_coeff)
    z = mcore.z_loss_func(logits, cfg.moe_z_loss_coeff)
    out = out.view(s, b, h)
    if layer.shared_expert is not None:
        out = out + layer.shared_expert(x)
    return out, aux, z


def grads(layer) -> dict:
    """Every parameter's grad (zero for an expert that got no token)."""
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in layer.named_parameters()}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_moe_layer_equals_reference(name):
    cfg, layer, recorder = build(VARIANTS[name])
    x = torch.randn(6, 2, 16, requires_grad=True)
    upstream = torch.randn(6, 2, 16)
    out = layer(x)
    (out * upstream).sum().backward()  # the aux and z losses enter through the router's backward
    got = {"x": x.grad.clone(), **grads(layer)}
    record = recorder.records[0]
    layer.zero_grad()
    x.grad = None
    ref_out, aux, z = reference(cfg, layer, x)
    ((ref_out * upstream).sum() + aux + z).backward()
    want = {"x": x.grad, **grads(layer)}
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"grad of {n}: {m}")
    torch.testing.assert_close(record["aux"].double(), aux.double().detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(record["z"].double(), z.double().detach(), rtol=1e-5, atol=0)
    assert record["tokens_per_expert"].sum().item() == 12 * cfg.moe_router_topk


def test_expert_bias_moves_against_the_load():
    _, layer, _ = build(VARIANTS["sigmoid-expert-bias"])
    before = layer.router.expert_bias.clone()
    layer.router.update_expert_bias(torch.tensor([10.0, 0.0, 5.0, 1.0]), 0.01)  # mean 4
    assert torch.allclose(layer.router.expert_bias - before, torch.tensor([-0.01, 0.01, -0.01, 0.01]))


def test_layer_pattern():
    assert moe_layer_pattern("1", 3) == [1, 1, 1]
    assert moe_layer_pattern("2", 4) == [1, 0, 1, 0]
    assert moe_layer_pattern("([0]+[1]*2)*2", 6) == [0, 1, 1, 0, 1, 1]
    for bad in ("[1,1]", "[2,0,0]", "__import__('os').system('true')", "0"):
        with pytest.raises(ValueError, match="--moe-layer-freq"):
            moe_layer_pattern(bad, 3)


@pytest.mark.parametrize("argv,world,message", [
    (["--num-experts", "6", "--expert-model-parallel-size", "4"], 4,
     "--num-experts 6 is not divisible by --expert-model-parallel-size 4"),
    (["--num-experts", "4", "--expert-model-parallel-size", "4", "--pipeline-model-parallel-size", "2"], 4,
     "world size 4 is not divisible by --expert-model-parallel-size 4 x --expert-tensor-parallel-size 1 x "
     "--pipeline-model-parallel-size 2"),
    (["--num-experts", "4", "--moe-router-topk", "5"], 1, "--moe-router-topk 5 exceeds --num-experts 4"),
    (["--expert-model-parallel-size", "2"], 2, "need --num-experts"),
    (["--num-experts", "4", "--tensor-model-parallel-size", "2"], 2, "needs --sequence-parallel"),
    (["--num-experts", "4", "--moe-router-enable-expert-bias"], 1, "needs --moe-router-score-function sigmoid"),
])
def test_bad_moe_flags_fail_at_start_up_with_one_line(argv, world, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv, world_size=world)
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_keeps_the_best_assignments_of_each_expert(policy):
    from megalite.model.moe.layer import within_capacity

    torch.manual_seed(1)
    T, k, E, factor = 20, 2, 4, 0.5  # capacity ceil(0.5 * 20 * 2 / 4) = 5 of 10 on average
    weights, experts = torch.rand(T, E).topk(k, dim=1)
    keep = within_capacity(weights, experts, E, factor, policy)
    for e in range(E):  # brute force: each expert's assignments, best first, the first 5 kept
        mine = [(t, j) for t in range(T) for j in range(k) if experts[t, j] == e]
        mine.sort(key=(lambda a: -weights[a].item()) if policy == "probs" else (lambda a: a))
        assert [keep[a].item() for a in mine] == [i < 5 for i in range(len(mine))]


def test_capacity_drops_tokens_in_the_layer():
    """A dropped (token, expert) pair contributes nothing: the layer with capacity equals the
    dropless layer with those routing weights zeroed."""
    from megalite.model.moe.layer import within_capacity

    cfg, layer, _ = build({"moe_expert_capacity_factor": 0.5})
    x = torch.randn(6, 2, 16)
    with torch.no_grad():
        out = layer(x)
        weights, experts = layer.router(x.reshape(12, 16), 2)
        keep = within_capacity(weights, experts, 4, 0.5, "probs")
        assert not keep.all()
        layer.capacity_factor = None
        layer.router.route = lambda logits, route=layer.router.route: (route(logits)[0] * keep, route(logits)[1])
        torch.testing.assert_close(out, layer(x), rtol=1e-6, atol=1e-6)
