"""Each tensor-parallel layer, forward and backward, against its plain PyTorch counterpart."""
import pytest
import torch
import torch.nn.functional as F

from distributed_helper import run_distributed
from megalite.parallel_state import ParallelState
from megalite.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                      gather_from_sequence_parallel, init_method_normal,
                                      model_parallel_seed, pad_vocab_size, parallel_lm_logits,
                                      reduce_scatter_to_sequence_parallel,
                                      scatter_to_sequence_parallel, vocab_parallel_cross_entropy)

TOL = dict(rtol=1e-6, atol=1e-6)
S, B, H, FFN = 8, 2, 16, 32


def _full_weight(shape, seed, std=0.5):
    torch.manual_seed(seed)
    w = torch.empty(shape)
    init_method_normal(std)(w)
    return w


def _inputs(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _shard(t, dim, rank, size):
    return t.chunk(size, dim=dim)[rank]


def _column_row(rank, world):
    ps = ParallelState.from_sizes(tp=world)
    init = init_method_normal(0.5)
    results = {}
    for gather in (False, True):
        torch.manual_seed(1)
        col = ColumnParallelLinear(H, FFN, tp_group=ps.tp_group, gather_output=gather, init_method=init)
        with torch.no_grad():  # a non-zero bias makes the bias path visible
            col.bias.copy_(_shard(torch.arange(FFN, dtype=torch.float32) / FFN, 0, rank, world))
        w = _full_weight((FFN, H), 1)
        x = _inputs(2, S, B, H).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        grad_out = _inputs(3, S, B, FFN)
        y = col(x)
        bias = torch.arange(FFN, dtype=torch.float32) / FFN
        y_ref = F.linear(x_ref, w.requires_grad_(), bias.requires_grad_())
        mine = grad_out if gather else _shard(grad_out, -1, rank, world)
        (y * mine).sum().backward()
        (y_ref * grad_out).sum().backward()
        torch.testing.assert_close(y, y_ref if gather else _shard(y_ref, -1, rank, world), **TOL)
        torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
        torch.testing.assert_close(col.weight.grad, _shard(w.grad, 0, rank, world), **TOL)
        torch.testing.assert_close(col.bias.grad, _shard(bias.grad, 0, rank, world), **TOL)
        results[f"col_gather={gather}"] = (y - (y_ref if gather else _shard(y_ref, -1, rank, world))).abs().max().item()

    for parallel_input in (True, False):
        torch.manual_seed(4)
        row = RowParallelLinear(FFN, H, tp_group=ps.tp_group, input_is_parallel=parallel_input, init_method=init)
        with torch.no_grad():
            row.bias.fill_(0.25)
        w = _full_weight((H, FFN), 4).requires_grad_()
        x_full = _inputs(5, S, B, FFN)
        x = (_shard(x_full, -1, rank, world) if parallel_input else x_full).clone().requires_grad_()
        x_ref = x_full.clone().requires_grad_()
        grad_out = _inputs(6, S, B, H)
        y, y_ref = row(x), F.linear(x_ref, w) + 0.25
        (y * grad_out).sum().backward()
        (y_ref * grad_out).sum().backward()
        torch.testing.assert_close(y, y_ref, **TOL)
        torch.testing.assert_close(x.grad, _shard(x_ref.grad, -1, rank, world) if parallel_input else x_ref.grad, **TOL)
        torch.testing.assert_close(row.weight.grad, _shard(w.grad, 1, rank, world), **TOL)
        torch.testing.assert_close(row.bias.grad, grad_out.sum((0, 1)), **TOL)
    return results


def _mlp_sequence_parallel(rank, world):
    """Column(SP) -> gelu -> Row(SP) on a sequence shard equals the serial MLP."""
    ps = ParallelState.from_sizes(tp=world)
    for sp in (False, True):
        torch.manual_seed(7)
        fc1 = ColumnParallelLinear(H, FFN, tp_group=ps.tp_group, sequence_parallel=sp)
        fc2 = RowParallelLinear(FFN, H, tp_group=ps.tp_group, sequence_parallel=sp)
        torch.manual_seed(7)
        ref1, ref2 = torch.nn.Linear(H, FFN), torch.nn.Linear(FFN, H)
        with torch.no_grad():
            ref1.weight.copy_(_full_weight((FFN, H), 7, std=0.02)); ref1.bias.zero_()
            torch.manual_seed(7); torch.empty(FFN, H).normal_(0, 0.02)  # same RNG use as fc1
            ref2.weight.copy_(torch.empty(H, FFN).normal_(0, 0.02)); ref2.bias.zero_()
        x_full = _inputs(8, S, B, H)
        x = (_shard(x_full, 0, rank, world) if sp else x_full).clone().requires_grad_()
        x_ref = x_full.clone().requires_grad_()
        y = fc2(F.gelu(fc1(x)))
        y_ref = ref2(F.gelu(ref1(x_ref)))
        g = _inputs(9, S, B, H)
        (y * (_shard(g, 0, rank, world) if sp else g)).sum().backward()
        (y_ref * g).sum().backward()
        torch.testing.assert_close(y, _shard(y_ref, 0, rank, world) if sp else y_ref, **TOL)
        torch.testing.assert_close(x.grad, _shard(x_ref.grad, 0, rank, world) if sp else x_ref.grad, **TOL)
        torch.testing.assert_close(fc1.weight.grad, _shard(ref1.weight.grad, 0, rank, world), **TOL)
        torch.testing.assert_close(fc2.weight.grad, _shard(ref2.weight.grad, 1, rank, world), **TOL)
        if sp:  # SP bias grads are partial sums: summing over TP gives the serial grad
            bias_grad = fc2.bias.grad.clone()
            torch.distributed.all_reduce(bias_grad, group=ps.tp_group)
            torch.testing.assert_close(bias_grad, ref2.bias.grad, **TOL)
            assert fc2.bias.sequence_parallel
        else:
            torch.testing.assert_close(fc2.bias.grad, ref2.bias.grad, **TOL)
    return True


def _embedding_and_loss(rank, world):
    ps = ParallelState.from_sizes(tp=world)
    vocab = 50
    padded = pad_vocab_size(vocab, 8, world)
    torch.manual_seed(11)
    emb = VocabParallelEmbedding(vocab, H, tp_group=ps.tp_group, padded_vocab_size=padded,
                                 init_method=init_method_normal(1.0))
    ref = torch.nn.Embedding(vocab, H)
    with torch.no_grad():  # the real rows are the unpadded table drawn from the same seed
        ref.weight.copy_(_full_weight((vocab, H), 11, std=1.0))
    ids = torch.randint(0, vocab, (S, B), generator=torch.Generator().manual_seed(12))
    ids[0, 0], ids[1, 0] = vocab - 1, 0  # both ends of the vocabulary
    out, out_ref = emb(ids), ref(ids)
    g = _inputs(13, S, B, H)
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    torch.testing.assert_close(out, out_ref, **TOL)
    full_grad = torch.cat([ref.weight.grad, torch.zeros(padded - vocab, H)])
    torch.testing.assert_close(emb.weight.grad, _shard(full_grad, 0, rank, world), **TOL)

    # Loss through tied output weights: padded columns must not change the loss.
    hidden = _inputs(14, S, B, H).requires_grad_()
    hidden_ref = hidden.detach().clone().requires_grad_()
    emb.weight.grad = None
    ref.weight.grad = None
    with torch.no_grad():  # garbage in the padding rows would leak into the softmax if unmasked
        emb.weight[emb.weight.shape[0] - 1].fill_(100.0) if rank == world - 1 and padded > vocab else None
    logits = parallel_lm_logits(hidden, emb.weight, ps.tp_group)
    target = torch.randint(0, vocab, (S, B), generator=torch.Generator().manual_seed(15))
    loss = vocab_parallel_cross_entropy(logits, target, ps.tp_group, vocab_size=vocab)
    loss_ref = F.cross_entropy(F.linear(hidden_ref, ref.weight).reshape(-1, vocab), target.reshape(-1),
                               reduction="none").reshape(S, B)
    w = _inputs(16, S, B)
    (loss * w).sum().backward()
    (loss_ref * w).sum().backward()
    torch.testing.assert_close(loss, loss_ref, **TOL)
    torch.testing.assert_close(hidden.grad, hidden_ref.grad, **TOL)
    real = slice(0, min(emb.weight.shape[0], max(0, vocab - emb.vocab_start)))
    torch.testing.assert_close(emb.weight.grad[real], ref.weight.grad[emb.vocab_start:emb.vocab_end][real], **TOL)
    return loss.sum().item()


def _sequence_parallel_mappings(rank, world):
    ps = ParallelState.from_sizes(tp=world)
    x_full = _inputs(20, S, B, H)
    x = x_full.clone().requires_grad_()
    shard = scatter_to_sequence_parallel(x, ps.tp_group)
    torch.testing.assert_close(shard, _shard(x_full, 0, rank, world))
    back = gather_from_sequence_parallel(shard, ps.tp_group, grad_is_partial=False)
    torch.testing.assert_close(back, x_full)  # scatter then gather is the identity
    back.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x_full))
    # reduce-scatter of per-rank partials then gather equals the all-reduced tensor
    partial = (x_full * (rank + 1)).requires_grad_()
    rs = reduce_scatter_to_sequence_parallel(partial, ps.tp_group)
    total = x_full * sum(range(1, world + 1))
    torch.testing.assert_close(rs, _shard(total, 0, rank, world))
    gathered = gather_from_sequence_parallel(rs, ps.tp_group)
    torch.testing.assert_close(gathered, total)
    gathered.sum().backward()  # grad: reduce-scatter(ones) -> world, then all-gather
    torch.testing.assert_close(partial.grad, torch.full_like(x_full, float(world)))
    return True


def _rng_streams(rank, world):
    ps = ParallelState.from_sizes(tp=world)
    tracker = model_parallel_seed(1234, ps.tp_rank)
    default = torch.rand(4)
    with tracker.fork():
        parallel = torch.rand(4)
    after = torch.rand(4)
    return default, parallel, after


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_column_and_row_parallel_linear(tp):
    run_distributed(_column_row, tp)


@pytest.mark.parametrize("tp", [2, 4])
def test_mlp_with_and_without_sequence_parallel(tp):
    assert run_distributed(_mlp_sequence_parallel, tp) == [True] * tp


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_embedding_and_cross_entropy(tp):
    losses = run_distributed(_embedding_and_loss, tp)
    assert len(set(round(v, 5) for v in losses)) == 1  # every TP rank sees the same loss


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_mappings_round_trip(tp):
    run_distributed(_sequence_parallel_mappings, tp)


def test_rng_tracker_differs_across_tp_only_in_model_parallel_stream():
    out = run_distributed(_rng_streams, 2)
    torch.testing.assert_close(out[0][0], out[1][0])  # default stream: identical
    torch.testing.assert_close(out[0][2], out[1][2])  # and fork() does not disturb it
    assert not torch.allclose(out[0][1], out[1][1])  # model-parallel stream: per rank


def test_pad_vocab_size():
    assert pad_vocab_size(50257, 128, 1) == 50304
    assert pad_vocab_size(50257, 128, 8) == 51200
    assert pad_vocab_size(256, 128, 2) == 256
