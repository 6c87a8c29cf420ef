"""Activation recompute (full uniform/block, selective) gives the loss and grads of no recompute,
with dropout on: the checkpointed forward replays the RNG streams exactly. (Recompute under
TP x PP against the serial run: tests/test_pipeline_equivalence.py.)"""
import pytest
import torch

from distributed_helper import run_distributed

DROPOUT = dict(attention_dropout=0.1, hidden_dropout=0.1)
VARIANTS = [
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=3),
    dict(recompute_granularity="selective"),
]
LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, disable_bias_linear=True,
             group_query_attention=True, num_query_groups=2)


def _run(model_kwargs: dict, tp: int, sequence_parallel: bool, steps: int = 2):
    """Build the tiny model (seed 1234), run ``steps`` micro-batches forward+backward with dropout,
    return (losses, {name: grad}, calls of each layer's and each core attention's forward)."""
    from megalite.config import Config, ModelConfig, validate
    from megalite.model.gpt import GPTModel
    from megalite.parallel_state import ParallelState
    from megalite.tensor_parallel import model_parallel_seed

    cfg = Config(model=ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16,
                                   **model_kwargs))
    validate(cfg)
    ps = ParallelState.from_sizes(tp=tp)
    tracker = model_parallel_seed(1234, ps.tp_rank)
    model = GPTModel(cfg.model, ps, vocab_size=100, tracker=tracker, sequence_parallel=sequence_parallel)
    model.train()
    calls = {"layer": 0, "core": 0}
    for layer in model.layers:
        layer.register_forward_hook(lambda *_: calls.__setitem__("layer", calls["layer"] + 1))
        core = layer.attention.core_attention
        layer.attention.core_attention = lambda *a, core=core: (calls.__setitem__("core", calls["core"] + 1),
                                                                 core(*a))[1]
    data = torch.Generator().manual_seed(7)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, 100, (2, 16), generator=data)
        loss = model(tokens, labels=tokens.roll(-1, dims=1)).mean()
        loss.backward()
        losses.append(loss.item())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return losses, grads, calls


def _compare(ref, got, tol=1e-6):
    (ref_loss, ref_grads, _), (loss, grads, _) = ref, got
    assert loss == pytest.approx(ref_loss, rel=tol, abs=0)
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=tol, atol=tol * 0.1, msg=name)


def _expected_calls(variant, steps=2, layers=4):
    """Forward calls with recompute: each recomputed layer / core attention runs twice."""
    if variant["recompute_granularity"] == "selective":
        return {"layer": steps * layers, "core": 2 * steps * layers}
    recomputed = layers if variant["recompute_method"] == "uniform" else variant["recompute_num_layers"]
    return {"layer": steps * (layers + recomputed), "core": steps * (layers + recomputed)}


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_recompute_matches_no_recompute_with_dropout(variant):
    ref = _run(DROPOUT, 1, False)
    got = _run({**DROPOUT, **variant}, 1, False)
    assert ref[2] == {"layer": 8, "core": 8}
    assert got[2] == _expected_calls(variant)  # it did recompute
    _compare(ref, got)
    # Dropout is really on (and differs per step): the replay is what makes the grads equal.
    no_dropout = _run({}, 1, False)
    assert abs(no_dropout[0][0] - ref[0][0]) > 1e-4


def test_recompute_llama_options():
    variant = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2)
    _compare(_run({**DROPOUT, **LLAMA}, 1, False), _run({**DROPOUT, **LLAMA, **variant}, 1, False))


def _tp_pair(rank, world, variant, sequence_parallel):
    ref = _run(DROPOUT, world, sequence_parallel)
    got = _run({**DROPOUT, **variant}, world, sequence_parallel)
    _compare(ref, got)
    return got[2]


@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[2], VARIANTS[4]],
                         ids=["full-uniform", "full-block", "selective"])
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_recompute_matches_no_recompute_at_tp2(variant, sequence_parallel):
    for calls in run_distributed(_tp_pair, 2, variant, sequence_parallel):
        assert calls == _expected_calls(variant)


def test_full_recompute_needs_a_method():
    from megalite.config import Config, ModelConfig, validate
    with pytest.raises(ValueError, match="--recompute-granularity full needs --recompute-method"):
        validate(Config(model=ModelConfig(recompute_granularity="full")))
