"""Sequence parallelism and context parallelism compute the serial model's grads and weights (fp32)."""
import pytest
import torch

from distributed_helper import run_distributed
from equivalence import TINY, assert_equivalent, run_layout, serial

SP = ["--sequence-parallel"]
LLAMA = ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
         "--disable-bias-linear", "--group-query-attention", "--num-query-groups", "2"]
DIST_OPT_OVERLAP = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--ddp-bucket-size", "2000"]


def tp(n):
    return ["--tensor-model-parallel-size", str(n)]


def cp(n):
    return ["--context-parallel-size", str(n)]


# -- sequence parallel -------------------------------------------------------------------
@pytest.mark.parametrize("layout,world", [(tp(2), 2), (tp(4), 4)])
def test_sequence_parallel_matches_serial(layout, world):
    assert_equivalent(serial(), run_layout(TINY + SP + layout, world))


def _train_steps_and_get_sp_params(rank, world, argv, steps, drop_sp_reduction):
    from megalite.config import parse_args
    from megalite.data.build import build_datasets
    from megalite.parallel_state import ParallelState
    from megalite.training import BatchIterator, Trainer

    cfg = parse_args(argv, world_size=world)
    ps = ParallelState.from_sizes(tp=cfg.parallel.tensor_model_parallel_size)
    (train_ds, _, _), vocab = build_datasets(cfg, log=lambda m: None)
    trainer = Trainer(cfg, ps, vocab)
    sp_names = [n for n, p in trainer.model[0].named_parameters() if getattr(p, "sequence_parallel", False)]
    if drop_sp_reduction:  # what a missing TP all-reduce of the partial grads would do
        for p in trainer.model[0].parameters():
            p.sequence_parallel = False
    params = dict(trainer.model[0].named_parameters())
    init = {n: params[n].detach().numpy().copy() for n in sp_names}  # numpy: pickled by value
    batches = BatchIterator(train_ds, cfg, ps)
    for _ in range(steps):
        trainer.train_step(batches.next_microbatches(cfg.num_microbatches))
    return init, {n: params[n].detach().numpy().copy() for n in sp_names}


def test_sequence_parallel_norm_weights_identical_across_tp_ranks():
    argv = TINY + SP + tp(2) + ["--hidden-dropout", "0.1"]  # SP dropout: different masks per rank
    (init, final), (_, final_1) = run_distributed(_train_steps_and_get_sp_params, 2, argv, 5, False)
    names = sorted(final)
    assert any("norm" in n for n in names) and any("proj.bias" in n for n in names)
    assert any("final_norm" in n for n in names) and any("fc2.bias" in n for n in names)
    for n in names:
        assert (final[n] == final_1[n]).all(), f"{n} differs between TP ranks"
        assert not (final[n] == init[n]).all(), f"{n} did not train"
    # Without the all-reduce over TP each rank would step on its own half of the sequence only.
    (_, broken), (_, broken_1) = run_distributed(_train_steps_and_get_sp_params, 2, argv, 5, True)
    assert all(not (broken[n] == broken_1[n]).all() for n in names)


# -- context parallel --------------------------------------------------------------------
def test_load_balanced_chunks():
    from megalite.model.context_parallel import get_batch_on_this_cp_rank, local_positions

    assert local_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert local_positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert local_positions(16, 1, 4).tolist() == [2, 3, 12, 13]
    covered = torch.cat([local_positions(24, r, 3) for r in range(3)]).sort().values
    assert covered.tolist() == list(range(24))
    tokens = torch.arange(16).view(2, 8)
    batch = {"tokens": tokens, "labels": tokens + 100, "loss_mask": torch.ones(2, 8)}
    part = get_batch_on_this_cp_rank(batch, 1, 2)
    assert part["tokens"].tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    assert part["labels"].tolist() == [[102, 103, 104, 105], [110, 111, 112, 113]]
    assert part["position_ids"].tolist() == [[2, 3, 4, 5]] * 2
    assert part["loss_mask"].shape == (2, 4)
    with pytest.raises(ValueError, match="not divisible by 2 x context-parallel size 2"):
        local_positions(6, 0, 2)


def _cp_attention(rank, world, q, k, v, grad_out):
    from megalite.model.context_parallel import context_parallel_attention, local_positions
    from megalite.model.transformer import ParallelContext
    from megalite.parallel_state import ParallelState

    ps = ParallelState.from_sizes(cp=world)
    index = local_positions(q.shape[0], ps.cp_rank, world)
    q, k, v = (t[index].clone().requires_grad_(True) for t in (q, k, v))
    out = context_parallel_attention(q, k, v, 0.0, ParallelContext(ps, None))
    out.backward(grad_out[index])
    return [t.detach().numpy() for t in (index, out, q.grad, k.grad, v.grad)]  # numpy: pickled by value


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_attention_forward_and_backward_match_full(world):
    from megalite.model.core_attention import sdpa_attention

    torch.manual_seed(0)
    s, b, n, g, d = 16, 2, 4, 2, 8
    q, k, v = torch.randn(s, b, n, d), torch.randn(s, b, g, d), torch.randn(s, b, g, d)
    grad_out = torch.randn(s, b, n * d)
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = sdpa_attention(*full, 0.0, None)
    ref.backward(grad_out)
    for result in run_distributed(_cp_attention, world, q, k, v, grad_out):
        index, out, dq, dk, dv = map(torch.from_numpy, result)
        torch.testing.assert_close(out, ref.detach()[index], rtol=1e-5, atol=1e-6)
        for got, want in zip((dq, dk, dv), full):
            torch.testing.assert_close(got, want.grad[index], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra,layout,world", [
    ((), cp(2), 2),
    ((), cp(2) + tp(2), 4),
    (tuple(LLAMA), cp(2), 2),                                     # RoPE with global positions
    (tuple(LLAMA), cp(2) + tp(2) + SP, 4),                        # CP x TP with sequence parallel
    ((), cp(2) + ["--pipeline-model-parallel-size", "2"], 4),     # CP x PP: p2p of seq / cp
    (("--recompute-granularity", "selective"), cp(2), 2),          # CP attention recomputed in backward
    ((), cp(2), 4),                                               # CP2 x DP2: grads reduced over dp_cp
    ((), cp(2) + DIST_OPT_OVERLAP, 4),                            # ZeRO shards over dp_cp, overlapped
])
def test_context_parallel_matches_serial(extra, layout, world):
    ref = serial(extra)
    assert ref["loss"][-1] < ref["loss"][0]
    assert_equivalent(ref, run_layout(TINY + list(extra) + layout, world))


def test_context_parallel_needs_divisible_sequence():
    from megalite.config import parse_args
    with pytest.raises(SystemExit):
        parse_args(TINY + ["--seq-length", "18"] + cp(2), world_size=2)  # 18 % 4 != 0


def _sp_linear_saved_bytes(rank, world):
    from megalite.parallel_state import ParallelState
    from megalite.tensor_parallel import ColumnParallelLinear

    ps = ParallelState.from_sizes(tp=world)
    torch.manual_seed(0)
    layer = ColumnParallelLinear(8, 16, tp_group=ps.tp_group, sequence_parallel=True)
    x = torch.randn(4, 2, 8, requires_grad=True)  # this rank's [s/tp, b, h] shard
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    return sum(saved.values()), x.nbytes, tuple(y.shape)


def test_sequence_parallel_linear_saves_only_the_local_shard():
    for saved, shard, out_shape in run_distributed(_sp_linear_saved_bytes, 2):
        assert out_shape == (8, 2, 8)  # gathered sequence, half the output features
        assert saved == shard          # not the gathered [s, b, h] input
