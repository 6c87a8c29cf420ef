"""Zero-bubble ZB-H1 (megalite/pipeline_parallel/zb_h1.py) on real models and processes.

* The B/W split (tensor_parallel/weight_grad.py: WeightGradStore, and the linears of layers.py)
  leaves the loss and every grad bit-identical to a plain backward, serial (fp32, bf16) and at
  TP=2 with and without sequence parallelism, and really defers the linears' weight grads (their
  hooks fire in W, once per micro-batch, also for a weight used twice).
* ZB-H1 layouts compute the serial model's loss, grad norm, grads and weights (the harness):
  PP=2 (tied embeddings), PP=4 with m = 8 and full recompute, TP=2 x PP=2 with SP and selective
  recompute, PP=2 in bf16, PP=2 x DP=2 with the distributed optimizer, --overlap-grad-reduce
  (every bucket holding a linear weight starts its reduction from a grad hook inside a W) and
  untied embeddings. Few processes in all: the suite runs on 2 cores.
* Start-up errors for what ZB-H1 does not support; the timeline shows F, B and W.

* On simulated ranks (tests/test_schedules.py's fake network with a virtual clock): the order
  of every rank, each W after its own B exactly once, routing, grads, deadlock freedom, and the
  idle slots in units of work: ZB-H1's at most (p-1)(F+B-W), 1F1B's exactly (p-1)(F+B+W).
"""
import contextlib

import pytest
import torch

from megalite.pipeline_parallel.schedules import one_f_one_b
from megalite.pipeline_parallel.zb_h1 import zb_h1

import test_schedules as sim
from distributed_helper import run_distributed
from equivalence import BF16, FP32, TINY, assert_equivalent, run_layout, serial

PP, TP = "--pipeline-model-parallel-size", "--tensor-model-parallel-size"
ZB = ["--pipeline-schedule", "zb-h1"]
LINEAR_WEIGHTS = ("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight", "output_layer.weight")


# -- the B/W split -------------------------------------------------------------------------------
def _model(argv, dtype, tp=1):
    from megalite.config import parse_args
    from megalite.model import GPTModel
    from megalite.parallel_state import ParallelState

    cfg = parse_args(TINY + ["--untie-embeddings-and-output-weights"] + argv, world_size=tp)
    ps = ParallelState.from_sizes(tp=tp)
    model = GPTModel(cfg.model, ps, vocab_size=100, sequence_parallel=cfg.parallel.sequence_parallel)
    return model.to(dtype)


def _backward(model, tokens, labels, mode: str):
    """Loss and grads by name after one backward: ``plain``; ``split``: B inside capture, then W
    (also returns the params whose grad B left to W and each param's hook count after B);
    ``attached``: store attached but B not captured (the store accumulates at once)."""
    from megalite.tensor_parallel.weight_grad import WeightGradStore

    model.zero_grad(set_to_none=True)
    store = WeightGradStore()
    hooks = {}
    handles = [p.register_post_accumulate_grad_hook(lambda p, n=n: hooks.__setitem__(n, hooks.get(n, 0) + 1))
               for n, p in model.named_parameters()]
    deferred, after_b = None, None
    with store.attached([model]) if mode != "plain" else contextlib.nullcontext():
        loss = model(tokens, labels=labels).sum()
        with store.capture(0) if mode == "split" else contextlib.nullcontext():
            loss.backward()
        if mode == "split":
            deferred = sorted(n for n, p in model.named_parameters() if p.grad is None)
            after_b = dict(hooks)
            store.run(0)
    for h in handles:
        h.remove()
    assert all(count == 1 for count in hooks.values()) and len(hooks) == len(list(model.parameters()))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, deferred, after_b


def _split_is_bit_identical(rank, world, argv, dtype):
    """Run plain / split / attached on the same model and batch; compare bitwise."""
    torch.manual_seed(0)
    model = _model(argv, dtype, tp=world)
    tokens = torch.randint(0, 100, (2, 16))
    labels = torch.randint(0, 100, (2, 16))
    ref_loss, ref, _, _ = _backward(model, tokens, labels, "plain")
    out = {}
    for mode in ("split", "attached"):
        loss, grads, deferred, after_b = _backward(model, tokens, labels, mode)
        out[mode] = {"loss": torch.equal(loss, ref_loss), "deferred": deferred, "hooks_in_b": after_b,
                     "differ": sorted(n for n in ref if not torch.equal(ref[n], grads[n]))}
    return out


def _split_tp2_with_and_without_sp(rank, world):
    return [_split_is_bit_identical(rank, world, [TP, "2"] + sp, torch.float32) for sp in ([], ["--sequence-parallel"])]


def _check_split(results):
    for result in results:
        assert result["split"]["loss"] and result["attached"]["loss"]
        assert result["split"]["differ"] == [] and result["attached"]["differ"] == []
        deferred = result["split"]["deferred"]
        assert deferred and all(n.endswith(LINEAR_WEIGHTS) for n in deferred), deferred
        assert len(deferred) == 4 * 4 + 1  # qkv, proj, fc1, fc2 of 4 layers + the output layer
        assert not set(deferred) & set(result["split"]["hooks_in_b"])  # no hook fired in B for them


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_backward_is_bit_identical_serial(dtype):
    """Loss and every grad equal a plain backward's bit for bit; the 17 linear weights are the
    ones deferred, their hooks fire in W only (once), norms, biases and embeddings in B."""
    _check_split([_split_is_bit_identical(0, 1, [], dtype)])
    _check_split([_split_is_bit_identical(0, 1, ["--swiglu", "--disable-bias-linear"], dtype)])


def test_split_backward_is_bit_identical_tp2_sequence_parallel():
    """The same at TP=2, with and without SP (the all-gathered input is kept for W)."""
    _check_split([r for per_rank in run_distributed(_split_tp2_with_and_without_sp, 2) for r in per_rank])


def test_weight_grad_store_refuses_a_w_before_its_b_or_twice():
    from megalite.tensor_parallel.weight_grad import WeightGradStore

    store = WeightGradStore()
    with pytest.raises(RuntimeError, match="W of micro-batch 0 before its B, or a second time"):
        store.run(0)
    with store.capture(0):
        pass
    assert store.pending() == [0]
    store.run(0)
    with pytest.raises(RuntimeError, match="W of micro-batch 0 before its B, or a second time"):
        store.run(0)
    with store.capture(1):
        pass
    with pytest.raises(RuntimeError, match="B of micro-batch 1 runs twice"):
        with store.capture(1):
            pass


def test_a_weight_used_twice_gets_its_summed_grad_in_one_accumulation():
    """The grad buffer counts one hook per parameter and micro-batch before a bucket is ready."""
    from megalite.tensor_parallel.layers import ColumnParallelLinear
    from megalite.tensor_parallel.weight_grad import WeightGradStore

    torch.manual_seed(0)
    linear = ColumnParallelLinear(4, 4, bias=False, init_method=torch.nn.init.normal_)
    x = torch.randn(3, 4, requires_grad=True)
    linear(linear(x)).sum().backward()
    ref, linear.weight.grad = linear.weight.grad, None
    hooks = []
    linear.weight.register_post_accumulate_grad_hook(hooks.append)
    store = WeightGradStore()
    with store.attached([linear]):
        y = linear(linear(x)).sum()
        with store.capture(0):
            y.backward()
        assert not hooks and linear.weight.grad is None
        store.run(0)
    assert len(hooks) == 1 and torch.allclose(linear.weight.grad, ref, rtol=1e-6, atol=0)


# -- layouts against the serial model ------------------------------------------------------------
# Few multi-process runs, each combining features (the suite runs on 2 cores): the harness compares
# loss, grad norm, every grad and every weight with the serial run.
@pytest.mark.parametrize("layout,world", [
    # m = 8 micro-batches on 4 stages (a long steady state), every layer recomputed in B
    ([PP, "4", "--micro-batch-size", "1", "--recompute-granularity", "full", "--recompute-method", "uniform",
      "--recompute-num-layers", "1"], 4),
    ([TP, "2", PP, "2", "--sequence-parallel", "--recompute-granularity", "selective"], 4),
    ([PP, "2", "--bf16"], 2),  # against the fp32 serial run, with the harness's bf16 tolerances
])
def test_zb_h1_layouts_match_serial(layout, world):
    assert_equivalent(serial(), run_layout(TINY + ZB + layout, world), BF16 if "--bf16" in layout else FP32)


def _buckets_start_in_w(trainer, rank):
    """``inject``: at the end of each iteration's schedule every (non-deferred) bucket holding a
    linear weight has started its DP reduction, from a grad hook inside a W."""
    from megalite.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megalite.tensor_parallel.weight_grad import WeightGradStore

    inside_w, launched = [False], {}
    run = WeightGradStore.run

    def run_marked(store, key):
        inside_w[0] = True
        try:
            run(store, key)
        finally:
            inside_w[0] = False
    WeightGradStore.run = run_marked
    buffer = trainer.buffer
    launch, finish = buffer._launch, buffer.finish_grad_sync

    def launch_recorded(bucket, async_op):
        if bucket.work is None:  # (finish_grad_sync calls it for started buckets too)
            launched[bucket.index] = inside_w[0]
        launch(bucket, async_op)

    def finish_checked():
        linear = {id(m.weight) for chunk in trainer.model for m in chunk.modules()
                  if isinstance(m, (ColumnParallelLinear, RowParallelLinear))}
        for bucket in buffer.buckets:
            if not bucket.deferred and any(id(p) in linear for p in bucket.params):
                assert launched.get(bucket.index), f"rank {rank}: bucket {bucket.index} did not start inside a W"
        launched.clear()
        finish()
    buffer._launch, buffer.finish_grad_sync = launch_recorded, finish_checked


def test_zb_h1_pp2_dp2_distributed_optimizer_overlap_untied_starts_buckets_in_w():
    """Untied embeddings here (the other layouts tie them): the output layer's weight sits in an
    ordinary bucket, whose reduction its W starts."""
    extra = ("--untie-embeddings-and-output-weights",)
    layout = [PP, "2", "--use-distributed-optimizer", "--overlap-grad-reduce", "--ddp-bucket-size", "2000"]
    assert_equivalent(serial(extra), run_layout(TINY + ZB + list(extra) + layout, 4, inject=_buckets_start_in_w))


# -- start-up errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("flags,world,message", [
    ([], 1, "--pipeline-schedule zb-h1 needs --pipeline-model-parallel-size > 1"),
    ([PP, "2", "--num-layers-per-virtual-pipeline-stage", "1"], 2,
     "--pipeline-schedule zb-h1 does not support --num-layers-per-virtual-pipeline-stage"),
])
def test_zb_h1_start_up_errors(flags, world, message, capsys):
    from megalite.config import parse_args
    from megalite.pipeline_parallel.schedules import get_schedule

    with pytest.raises(SystemExit) as e:
        parse_args(TINY + ZB + flags, world_size=world)
    assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(ValueError, match="zb-h1"):
        get_schedule(2, 2, "zb-h1")


def test_zb_h1_pp2_matches_serial_and_its_timeline_shows_f_b_and_w(tmp_path, capsys):
    """PP=2 (m = 4) equals the serial run; with --timeline-file each rank records m forwards,
    m B's and m W's per iteration, and tools/plot_timeline.py recognises ZB-H1 and computes its
    theory from the measured times."""
    from tools import plot_timeline

    path = str(tmp_path / "tl")
    assert_equivalent(serial(), run_layout(TINY + ZB + [PP, "2", "--timeline-file", path], 2))
    last = plot_timeline.select_iteration(plot_timeline.load(path))
    for r in last:
        kinds = [k for k, _, _ in r["events"]]
        assert kinds.count("forward") == kinds.count("backward") == kinds.count("weight") == 4
    rank1 = [k[0].upper() for k, _, _ in last[1]["events"] if k != "comm"]
    assert "".join(rank1) == "FBFBWFBWFBWW"  # rank 1 (r = 1): each B(i) followed by W(i - 1)
    plot_timeline.main([path, "--no-plot"])
    assert "(p-1)(F+B-W)/(m(F+B+W)+(p-1)(F+B-W))" in capsys.readouterr().out


# -- the schedule on simulated ranks (tests/test_schedules.py's fake network and chunks) ------------------------------------------------------------------------
def expected_zb_h1(pp: int, rank: int, m: int) -> str:
    """ZB-H1 by definition: 1F1B's warmup and order of F and B, each B(i) followed by
    W(i - rank), the W's still held back at the end."""
    warmup = min(pp - rank - 1, m)

    def b(i):
        return [f"B{i}"] + ([f"W{i - rank}"] if i >= rank else [])
    ops = [f"F{i}" for i in range(warmup)]
    for i in range(m - warmup):
        ops += [f"F{warmup + i}"] + b(i)
    for i in range(m - warmup, m):
        ops += b(i)
    return " ".join(ops + [f"W{i}" for i in range(max(m - rank, 0), m)])


def test_zb_h1_order_p4_m8_written_out():
    logs = [sim.fmt(r["ops"]) for r in sim.run_pipeline(zb_h1, 4, 8)]
    assert logs == [
        "F0 F1 F2 F3 B0 W0 F4 B1 W1 F5 B2 W2 F6 B3 W3 F7 B4 W4 B5 W5 B6 W6 B7 W7",
        "F0 F1 F2 B0 F3 B1 W0 F4 B2 W1 F5 B3 W2 F6 B4 W3 F7 B5 W4 B6 W5 B7 W6 W7",
        "F0 F1 B0 F2 B1 F3 B2 W0 F4 B3 W1 F5 B4 W2 F6 B5 W3 F7 B6 W4 B7 W5 W6 W7",
        "F0 B0 F1 B1 F2 B2 F3 B3 W0 F4 B4 W1 F5 B5 W2 F6 B6 W3 F7 B7 W4 W5 W6 W7",
    ]


@pytest.mark.parametrize("pp,m", [(4, 8), (2, 4), (4, 4), (3, 5), (4, 2), (2, 1), (4, 16)])
def test_zb_h1_order_losses_and_grads(pp, m):
    """Each rank runs the defined order (every W after its own B, exactly once: the grads of
    w, accumulated only in W, equal the serial ones) and routes every message right."""
    results = sim.run_pipeline(zb_h1, pp, m)
    for rank, r in enumerate(results):
        assert sim.fmt(r["ops"]) == expected_zb_h1(pp, rank, m), f"rank {rank}"
    ref_losses, ref_grads = sim.serial_reference(pp, m)
    assert results[-1]["losses"] == pytest.approx(ref_losses, rel=1e-6)
    assert all(not r["losses"] for r in results[:-1])
    for rank, r in enumerate(results):
        assert r["grads"][rank] == pytest.approx(ref_grads[rank], rel=1e-6)


@pytest.mark.parametrize("costs", [dict(F=1, B=1, W=1), dict(F=1, B=2, W=1), dict(F=2, B=2, W=1),
                                   dict(F=1, B=1.5, W=0.5)])
@pytest.mark.parametrize("pp,m", [(2, 2), (2, 8), (3, 5), (4, 4), (4, 8), (4, 16)])
def test_zb_h1_bubble_vs_1f1b(pp, m, costs):
    """Idle slots per rank in units of work (m >= p): 1F1B's (p-1)(F+B+W), ZB-H1's at most
    (p-1)(F+B-W), a third of 1F1B's when F = B = W."""
    F, B, W = costs["F"], costs["B"], costs["W"]
    assert sim.idle(sim.run_pipeline(one_f_one_b, pp, m, costs=costs)) == pytest.approx([(pp - 1) * (F + B + W)] * pp)
    zb = sim.idle(sim.run_pipeline(zb_h1, pp, m, costs=costs))
    assert max(zb) <= (pp - 1) * (F + B - W) + 1e-9, zb
    if F == B == W:
        assert zb == pytest.approx([(pp - 1) * F] * pp)


@pytest.mark.parametrize("pp,m", [(4, 2), (3, 1), (4, 3)])
def test_zb_h1_with_fewer_microbatches_than_stages_idles_less_than_1f1b(pp, m):
    assert max(sim.idle(sim.run_pipeline(zb_h1, pp, m))) < min(sim.idle(sim.run_pipeline(one_f_one_b, pp, m)))


def test_fake_network_detects_a_send_waited_for_but_never_received(monkeypatch):
    """ZB-H1's sends do not block, but a wait on one does until its receive is posted."""
    monkeypatch.setattr(sim, "TIMEOUT", 0.5)

    def bad_schedule(step_fn, model, mbs, grad_scale, p2p, **_):
        if p2p.pstate.pp_rank == 0:
            p2p.isend_forward(torch.zeros(2), last_stage=False).wait()
        return []
    with pytest.raises(TimeoutError, match="deadlock"):
        sim.run_pipeline(bad_schedule, 2, 2)
