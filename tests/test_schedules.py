"""Pipeline schedules in one process: per-rank order of forwards/backwards, message routing and
deadlock freedom, checked with a simulated network (no torch.distributed).

Each pipeline rank runs the real schedule function in its own thread. ``FakeP2P`` replaces the
batched isend/irecv by rendezvous channels keyed like gloo's ``(src, dst, tag)``: a send
completes only once the matching receive is posted, and a receive once the matching send is
posted, so a schedule whose sends and receives are not paired in order deadlocks here (and the
test fails after a timeout) just as it would over gloo. Fake chunks ``y = x * w`` tag every
activation with (virtual stage, micro-batch), so a mis-routed tensor is caught on arrival, and
their parameter grads are compared with a serial run of the same chain.

The network also keeps a virtual clock per rank: a forward, an input-grad backward (B) and a
weight-grad step (W) advance their rank's clock by their cost in units of work, a message is
available from the time its send was posted, a send completes when its receive is posted, and
a rank that waits moves its clock to that time. A rank's idle time is then the schedule's own
bubble in units of work (communication free), whatever the threads and the machine do.
"""
from __future__ import annotations

import sys
import threading
from collections import defaultdict
from unittest import mock

import pytest
import torch

from megalite.parallel_state import ParallelState
from megalite.pipeline_parallel.interleaved import interleaved_one_f_one_b
from megalite.pipeline_parallel.p2p import ACTIVATION_TAG, GRADIENT_TAG, P2P
from megalite.pipeline_parallel.schedules import forward_backward_no_pipelining, gpipe, one_f_one_b
from megalite.pipeline_parallel.zb_h1 import zb_h1
from megalite.tensor_parallel.layers import ColumnParallelLinear
from megalite.tensor_parallel.weight_grad import WeightGradStore

TIMEOUT = 10.0


class FakeNetwork:
    """Rendezvous channels shared by the ranks' threads, and the ranks' virtual clocks."""

    def __init__(self, costs: dict | None = None):
        self.cond = threading.Condition()
        self.sent = defaultdict(list)      # (src, dst, tag) -> payloads, in send order
        self.sent_at = defaultdict(list)   # (src, dst, tag) -> the sender's clock at each send
        self.recv_at = defaultdict(list)   # (src, dst, tag) -> the receiver's clock at each receive posted
        self.costs = costs or {"F": 1.0, "B": 1.0, "W": 1.0}
        self.clock = defaultdict(float)    # rank -> virtual time
        self.busy = defaultdict(float)     # rank -> time spent computing

    def work(self, rank, kind):
        """Rank ``rank`` computes one ``kind`` step (F, B or W)."""
        with self.cond:
            self.clock[rank] += self.costs[kind]
            self.busy[rank] += self.costs[kind]

    def _post_send(self, rank, key, tensor) -> int:
        self.sent[key].append(tensor.detach().clone())
        self.sent_at[key].append(self.clock[rank])
        return len(self.sent[key]) - 1

    def _wait(self, rank, key, index, send: bool) -> None:
        """Block until op ``index`` on channel ``key`` is matched (lock held); advance the clock."""
        ready = (lambda: len(self.recv_at[key]) > index) if send else (lambda: len(self.sent[key]) > index)
        if not self.cond.wait_for(ready, timeout=TIMEOUT):
            raise TimeoutError(f"rank {rank}: deadlock (an op was never matched)")
        other = self.recv_at[key][index] if send else self.sent_at[key][index]
        self.clock[rank] = max(self.clock[rank], other)

    def communicate(self, rank, ps, send_next, recv_prev, send_prev, recv_next):
        waits = []  # (channel, index, result slot or None for a send) for every op of this call
        with self.cond:
            for tensor, peer, tag in ((send_next, ps.next_pp_rank, ACTIVATION_TAG),
                                      (send_prev, ps.prev_pp_rank, GRADIENT_TAG)):
                if tensor is not None:
                    key = (rank, peer, tag)
                    waits.append((key, self._post_send(rank, key, tensor), None))
            for wanted, peer, tag, slot in ((recv_prev, ps.prev_pp_rank, ACTIVATION_TAG, 0),
                                            (recv_next, ps.next_pp_rank, GRADIENT_TAG, 1)):
                if wanted:
                    key = (peer, rank, tag)
                    self.recv_at[key].append(self.clock[rank])
                    waits.append((key, len(self.recv_at[key]) - 1, slot))
            self.cond.notify_all()
            result = [None, None]
            for key, index, slot in waits:
                self._wait(rank, key, index, send=slot is None)
                if slot is not None:
                    result[slot] = self.sent[key][index].clone()
        if result[0] is not None:
            result[0].requires_grad_(True)
        return tuple(result)

    def isend(self, rank, peer, tag, tensor) -> "FakeRequest":
        """A send that returns at once; its ``wait()`` blocks until the receive is posted."""
        with self.cond:
            key = (rank, peer, tag)
            index = self._post_send(rank, key, tensor)
            self.cond.notify_all()
        return FakeRequest(self, rank, key, index)


class FakeRequest:
    def __init__(self, net, rank, key, index):
        self.net, self.rank, self.key, self.index = net, rank, key, index

    def wait(self):
        with self.net.cond:
            self.net._wait(self.rank, self.key, self.index, send=True)


class FakeP2P(P2P):
    def __init__(self, net: FakeNetwork, ps: ParallelState):
        super().__init__(ps, (2,), torch.float32, torch.device("cpu"))
        self.net = net

    def communicate(self, send_next=None, recv_prev=False, send_prev=None, recv_next=False):
        return self.net.communicate(self.pstate.pp_rank, self.pstate, send_next, recv_prev, send_prev, recv_next)

    def _isend(self, tensor, peer, tag):
        return self.net.isend(self.pstate.pp_rank, peer, tag, tensor)


class FakeChunk(torch.nn.Module):
    """Virtual stage ``stage``: ``y = x * w`` (a 1 x 1 column-parallel linear, so a zero-bubble
    schedule defers its weight grad); element 1 carries a tag (stage, micro-batch)."""

    def __init__(self, stage: int, num_stages: int):
        super().__init__()
        self.stage, self.num_stages = stage, num_stages
        self.linear = ColumnParallelLinear(1, 1, bias=False, init_method=lambda w: w.fill_(1.0 + 0.1 * stage))
        self.w = self.linear.weight
        self.input_tensor = None

    def set_input_tensor(self, tensor):
        self.input_tensor = tensor


_RUNNING = threading.local()  # per rank thread: the micro-batch whose backward (b) or W (w) runs


def make_step_fn(log: list, net: FakeNetwork | None = None, rank: int | None = None):
    """``step_fn`` that records ``F``/``B`` ops as (kind, chunk index on the rank, micro-batch)
    and charges their cost to ``rank``'s clock on ``net``."""
    def step_fn(chunk, mb):
        i = mb["index"]
        if chunk.stage == 0:
            x = torch.stack([mb["x"], torch.tensor(0.0)])
        else:
            x = chunk.input_tensor
            assert int(x[1]) == 1000 * (chunk.stage - 1) + i, (
                f"stage {chunk.stage} mb {i} got the activation tagged {int(x[1])}")
        out = torch.stack([chunk.linear(x[0].reshape(1, 1)).reshape(()), x[1] * 0 + 1000 * chunk.stage + i])
        _charge(log, net, rank, ("F", chunk.vp, i))

        def on_backward(grad):  # fires in this op's backward (B, or 1F1B's whole backward)
            _RUNNING.b = i
            _charge(log, net, rank, ("B", chunk.vp, i))
        out.register_hook(on_backward)
        return out, lambda o: (o[0] * (i + 1), 1)
    return step_fn


def record_weight_grads(chunk, log: list, net: FakeNetwork | None, rank: int) -> None:
    """Log ``W`` (and charge it) when ``chunk.w``'s grad is accumulated: in the backward (1F1B)
    or when a zero-bubble schedule runs W."""
    def on_accumulate(param):
        w = getattr(_RUNNING, "w", None)
        _charge(log, net, rank, ("W", chunk.vp, _RUNNING.b if w is None else w))
    chunk.w.register_post_accumulate_grad_hook(on_accumulate)


def _charge(log, net, rank, op) -> None:
    log.append(op)
    if net is not None:
        net.work(rank, op[0])


_store_run = WeightGradStore.run


def _run_recording_key(store, key):
    _RUNNING.w = key
    try:
        _store_run(store, key)
    finally:
        _RUNNING.w = None


def microbatches(m: int) -> list[dict]:
    return [{"index": i, "x": torch.tensor(1.0 + i)} for i in range(m)]


def run_pipeline(schedule, pp: int, m: int, vpp: int = 1, forward_only: bool = False, costs=None):
    """Run ``schedule`` on ``pp`` simulated ranks; return per-rank logs (``log``: F and B,
    ``ops``: with W), losses, grads, clock at the end and busy time."""
    net, stages = FakeNetwork(costs), pp * vpp
    results, errors = {}, []

    def rank_main(rank):
        try:
            ps = ParallelState(world_size=pp, rank=rank, pp_size=pp, pp_rank=rank,
                               vpp_size=vpp if vpp > 1 else None, group_ranks={"pp": list(range(pp))})
            log: list = []
            chunks = []
            for v in range(vpp):
                chunk = FakeChunk(v * pp + rank, stages)
                chunk.vp = v
                record_weight_grads(chunk, log, net, rank)
                chunks.append(chunk)
            losses = schedule(make_step_fn(log, net, rank), chunks, microbatches(m), 0.5, FakeP2P(net, ps),
                              forward_only=forward_only)
            results[rank] = {"log": [op for op in log if op[0] != "W"], "ops": log,
                             "losses": [float(l) for l, _ in losses],
                             "grads": {c.stage: None if c.w.grad is None else float(c.w.grad) for c in chunks},
                             "clock": net.clock[rank], "busy": net.busy[rank]}
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(pp)]
    with mock.patch.object(WeightGradStore, "run", _run_recording_key):
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=3 * TIMEOUT)
    if errors:
        raise errors[0]
    assert len(results) == pp, "a rank did not finish"
    return [results[r] for r in range(pp)]


def idle(results) -> list[float]:
    """Each rank's idle time in units of work: from 0 to the last rank's end, not computing."""
    span = max(r["clock"] for r in results)
    return [span - r["busy"] for r in results]


def serial_reference(stages: int, m: int):
    """Losses and ``w`` grads of the same chain of ``stages`` fake chunks run serially."""
    ws = [1.0 + 0.1 * s for s in range(stages)]
    losses = [(1.0 + i) * torch.tensor(ws).prod().item() * (i + 1) for i in range(m)]
    grads = {s: sum(0.5 * (1.0 + i) * (i + 1) * torch.tensor(ws).prod().item() / ws[s] for i in range(m))
             for s in range(stages)}
    return losses, grads


def fmt(log, vpp=1) -> str:
    return " ".join(f"{k}{i}" if vpp == 1 else f"{k}{v}.{i}" for k, v, i in log)


def expected_1f1b(pp: int, rank: int, m: int) -> str:
    """PipeDream-Flush by definition: pp - rank - 1 warmup forwards, 1F1B, drain."""
    warmup = min(pp - rank - 1, m)
    ops = [f"F{i}" for i in range(warmup)]
    for i in range(m - warmup):
        ops += [f"F{warmup + i}", f"B{i}"]
    return " ".join(ops + [f"B{i}" for i in range(m - warmup, m)])


# -- 1F1B ------------------------------------------------------------------------------------
def test_1f1b_order_p4_m8_written_out():
    logs = [fmt(r["log"]) for r in run_pipeline(one_f_one_b, 4, 8)]
    assert logs == [
        "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7",
        "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6 B7",
        "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7",
        "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7",
    ]


@pytest.mark.parametrize("pp,m", [(4, 8), (2, 4), (4, 2), (2, 1), (3, 5)])
def test_1f1b_order_losses_and_grads(pp, m):
    results = run_pipeline(one_f_one_b, pp, m)
    for rank, r in enumerate(results):
        assert fmt(r["log"]) == expected_1f1b(pp, rank, m), f"rank {rank}"
    ref_losses, ref_grads = serial_reference(pp, m)
    assert results[-1]["losses"] == pytest.approx(ref_losses, rel=1e-6)
    assert all(not r["losses"] for r in results[:-1])
    for rank, r in enumerate(results):
        assert r["grads"][rank] == pytest.approx(ref_grads[rank], rel=1e-6)


def test_1f1b_p4_m2_is_capped_warmup():
    logs = [fmt(r["log"]) for r in run_pipeline(one_f_one_b, 4, 2)]
    assert logs == ["F0 F1 B0 B1", "F0 F1 B0 B1", "F0 F1 B0 B1", "F0 B0 F1 B1"]


def test_gpipe_order():
    logs = [fmt(r["log"]) for r in run_pipeline(gpipe, 2, 3)]
    assert logs == ["F0 F1 F2 B2 B1 B0"] * 2


def test_forward_only_runs_no_backward():
    for schedule, vpp in ((one_f_one_b, 1), (interleaved_one_f_one_b, 2), (zb_h1, 1)):
        results = run_pipeline(schedule, 2, 4, vpp=vpp, forward_only=True)
        assert all(k == "F" for r in results for k, _, _ in r["ops"])
        assert results[-1]["losses"] == pytest.approx(serial_reference(2 * vpp, 4)[0], rel=1e-6)


def test_no_pipelining_accumulates():
    chunk, log = FakeChunk(0, 1), []
    chunk.vp = 0
    losses = forward_backward_no_pipelining(make_step_fn(log), [chunk], microbatches(3), 0.5)
    assert fmt(log) == "F0 B0 F1 B1 F2 B2"
    assert [float(l) for l, _ in losses] == pytest.approx(serial_reference(1, 3)[0])
    assert float(chunk.w.grad) == pytest.approx(serial_reference(1, 3)[1][0])


# -- interleaved 1F1B --------------------------------------------------------------------------
def megatron_order(pp: int, rank: int, vpp: int, m: int) -> list[tuple[str, int, int]]:
    """Megatron-Core's interleaved order on ``rank``: forward k runs chunk (k % (pp*V)) // pp on
    micro-batch (k // (pp*V)) * pp + k % pp, backward k the same with the chunk reversed."""
    total = m * vpp
    warmup = total if m == pp else min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)

    def op(kind, k):
        v = (k % (pp * vpp)) // pp
        return (kind, v if kind == "F" else vpp - 1 - v, (k // (pp * vpp)) * pp + k % pp)
    ops = [op("F", k) for k in range(warmup)]
    for k in range(total - warmup):
        ops += [op("F", warmup + k), op("B", k)]
    return ops + [op("B", k) for k in range(total - warmup, total)]


def test_interleaved_order_p2_v2_m4_written_out():
    logs = [fmt(r["log"], 2) for r in run_pipeline(interleaved_one_f_one_b, 2, 4, vpp=2)]
    # rank 0: warmup (2-0-1)*2 + (2-1)*2 = 4 forwards; rank 1: 2.  "F1.2" = forward, chunk 1, mb 2
    assert logs == [
        "F0.0 F0.1 F1.0 F1.1 F0.2 B1.0 F0.3 B1.1 F1.2 B0.0 F1.3 B0.1 B1.2 B1.3 B0.2 B0.3",
        "F0.0 F0.1 F1.0 B1.0 F1.1 B1.1 F0.2 B0.0 F0.3 B0.1 F1.2 B1.2 F1.3 B1.3 B0.2 B0.3",
    ]


@pytest.mark.parametrize("pp,vpp,m", [(2, 2, 4), (2, 2, 2), (2, 2, 8), (4, 2, 8), (4, 2, 4), (2, 3, 6), (3, 2, 9)])
def test_interleaved_order_losses_and_grads(pp, vpp, m):
    results = run_pipeline(interleaved_one_f_one_b, pp, m, vpp=vpp)
    for rank, r in enumerate(results):
        assert r["log"] == megatron_order(pp, rank, vpp, m), f"rank {rank}"
    ref_losses, ref_grads = serial_reference(pp * vpp, m)
    assert results[-1]["losses"] == pytest.approx(ref_losses, rel=1e-6)
    grads = {s: g for r in results for s, g in r["grads"].items()}
    assert grads == pytest.approx(ref_grads, rel=1e-6)


def test_interleaved_rejects_m_not_multiple_of_pp():
    with pytest.raises(ValueError, match=r"number of micro-batches \(3\).*multiple of the pipeline-parallel size \(2\)"):
        run_pipeline(interleaved_one_f_one_b, 2, 3, vpp=2)


def test_fake_network_detects_deadlock(monkeypatch):
    """The simulation is strict: two ranks that both receive before sending hang (and fail)."""
    monkeypatch.setattr(sys.modules[__name__], "TIMEOUT", 0.5)

    def bad_schedule(step_fn, model, mbs, grad_scale, p2p, **_):
        p2p.communicate(recv_next=True)
        return []
    with pytest.raises(TimeoutError, match="deadlock"):
        run_pipeline(bad_schedule, 2, 2)


# -- tools/plot_timeline.py ----------------------------------------------------------------------
def test_plot_timeline_measures_the_ideal_1f1b_bubble(tmp_path, capsys):
    """An ideal 1F1B timeline (p=2, m=2, unit forward and backward) has the theoretical bubble
    (p-1)/(m+p-1) = 1/3; ranks with different clock origins and an earlier iteration are handled."""
    import json
    from tools import plot_timeline

    # rank 1: F0 B0 F1 B1 at 1..5; rank 0: F0 F1 at 0..2, waits, B0 at 3, B1 at 5 (absolute times + 100)
    ideal = {0: [("forward", 0, 1), ("forward", 1, 2), ("comm", 2, 3), ("backward", 3, 4), ("comm", 4, 5),
                 ("backward", 5, 6)],
             1: [("comm", 0, 1), ("forward", 1, 2), ("backward", 2, 3), ("forward", 3, 4), ("backward", 4, 5)]}
    for rank, events in ideal.items():
        origin = 90.0 + rank  # each rank's perf_counter origin
        earlier = [("iteration", 0.0, 9.0), ("forward", 1.0, 8.5)]  # a slow first iteration
        shifted = [(k, 100 + s - origin, 100 + e - origin) for k, s, e in events]
        last = [("iteration", 100 - origin - 0.5, 100 - origin + 6.5)]
        (tmp_path / f"run.rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "origin": origin, "meta": {"pp_size": 2, "microbatches": 2, "vpp_size": 1},
             "events": earlier + shifted + last}))
    ranks = plot_timeline.select_iteration(plot_timeline.load(str(tmp_path / "run")))
    t0, t1, stats = plot_timeline.bubble_fractions(ranks)
    assert (t0, t1) == (100.0, 106.0)
    assert [s["bubble"] for s in stats] == pytest.approx([1 / 3, 1 / 3])
    assert [s["comm"] for s in stats] == pytest.approx([2.0, 1.0])
    assert plot_timeline.theory(2, 2) == pytest.approx(1 / 3)
    assert plot_timeline.theory(4, 8, 2) == pytest.approx(3 / 19)
    first = plot_timeline.bubble_fractions(plot_timeline.select_iteration(
        plot_timeline.load(str(tmp_path / "run")), 0))[2]
    assert [s["busy"] for s in first] == pytest.approx([7.5, 7.5])

    pytest.importorskip("matplotlib")
    png = tmp_path / "timeline.png"
    plot_timeline.main([str(tmp_path / "run"), "--output", str(png)])
    out = capsys.readouterr().out
    assert "p=2 m=2 V=1: (p-1)/(V*m+p-1) = 0.333" in out and " mean" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
