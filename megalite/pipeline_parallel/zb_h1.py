"""Zero-bubble pipeline schedule ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024).

1F1B runs the backward of a micro-batch as one step. ZB-H1 splits it in two:

* **B**, the grad of the stage's input (and of the parameters outside the linears: norms,
  biases, embeddings). The previous stage waits for it: B is on the critical path.
* **W**, the grads of the linears' weights, which only the optimizer step needs. During B the
  tensor-parallel linears hand them to a :class:`~megalite.tensor_parallel.layers.WeightGradStore`;
  W computes and accumulates them, and only then do their grad hooks fire (so the grad buffer's
  buckets become ready, and start their reduction under ``--overlap-grad-reduce``, after W).

Order on pipeline rank ``r`` of ``p``, with ``m`` micro-batches: ``w = min(p - r - 1, m)``
warmup forwards as in 1F1B, and each ``B(i)`` followed by ``W(i - r)``::

    warmup:   F(0) .. F(w-1)
    steady:   F(w+i)  B(i)  W(i-r)        for i = 0 .. m-w-1
    cooldown: B(i)  W(i-r)                for i = m-w .. m-1
    then the W's still held back:  W(m-r) .. W(m-1)            (W(j) runs only for j >= 0)

Rank ``r`` holds back ``r`` W's: the later the stage, the sooner its B's reach the stages before
it, and the held-back W's fill the end of the iteration, where 1F1B's later stages sit idle.
With F, B and W of equal length each rank idles ``(p-1)(F+B-W)`` per iteration, a third of
1F1B's ``(p-1)(F+B+W)`` (``tests/test_zb_h1.py`` counts the idle slots on simulated ranks).
A rank holds at most ``p`` micro-batches between their F and W (1F1B's rank 0 holds ``p``
between F and B); a micro-batch past its B keeps only what W needs: the linears' inputs and
output grads.

Communication: sends are posted without waiting (:meth:`~.p2p.P2P.isend_forward`) and
receives block right before the step that needs them, so a rank only ever waits for data it
needs. (With 1F1B's blocking exchanges a rank would also wait for its neighbour to be ready to
receive, which with W's in between gives back most of the gain.) Between two ranks the sends
and receives of one kind are posted in the same order, so the k-th message sent is the k-th
received. A send is waited for once its arrival is certain, so the wait is free: an activation
when its grad has come back, an input grad when the activation that the previous stage sends
after that micro-batch's B has arrived (it runs ``F(w' + k + 1)`` right after ``B(k)``,
``w' = min(p - r, m)`` being its warmup), the rest at the end.
"""
from __future__ import annotations

import time
from collections import deque

from ..tensor_parallel.weight_grad import WeightGradStore
from .p2p import P2P
from .steps import backward_step, forward_step, free_output


class _ZeroBubbleRun:
    """One run of ZB-H1 on this rank: the steps F, B and W of micro-batch ``i`` with their
    communication; :func:`zb_h1` orders the calls."""

    def __init__(self, step_fn, model, microbatches, grad_scale: float, p2p: P2P, timeline):
        (self.chunk,) = model
        ps = p2p.pstate
        self.p, self.rank, self.m = ps.pp_size, ps.pp_rank, len(microbatches)
        self.first, self.last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        self.step_fn, self.microbatches, self.grad_scale = step_fn, microbatches, grad_scale
        self.p2p, self.timeline = p2p, timeline
        self.losses: list = []
        self.store = WeightGradStore()
        self.in_flight: deque = deque()     # (input, output) forwarded, not yet B'd; oldest first
        self.sent_outputs: deque = deque()  # send requests of outputs whose grad is not back yet
        self.sent_grads: deque = deque()    # (micro-batch, send request) of input grads
        self.prev_warmup = min(self.p - self.rank, self.m)  # warmup forwards of the previous stage

    def num_warmup(self) -> int:
        """Forwards before the first B (as 1F1B)."""
        return min(self.p - self.rank - 1, self.m)

    def forward(self, i: int) -> None:
        """F(i): receive the input, run the chunk, post the output's send."""
        input_tensor = self.p2p.recv_forward(self.first)
        self._wait_grad_sends(up_to=i - self.prev_warmup - 1)  # the previous stage ran B(up_to)
        output = forward_step(self.step_fn, self.chunk, self.microbatches[i], input_tensor, self.last,
                              self.grad_scale, self.losses, self.timeline)
        request = self.p2p.isend_forward(output, self.last)
        if request is not None:
            self.sent_outputs.append(request)
            free_output(output)  # the request holds the data until it is sent
        self.in_flight.append((input_tensor, output))

    def backward(self, i: int) -> None:
        """B(i): receive the output grad, back-propagate to the input (the linears' weight grads
        go to the store), post the input grad's send."""
        output_grad = self.p2p.recv_backward(self.last)
        if output_grad is not None:  # the grad of output i is back, so output i has arrived
            self.sent_outputs.popleft().wait()
        input_tensor, output = self.in_flight.popleft()
        with self.store.capture(i):
            input_grad = backward_step(input_tensor, output, output_grad, self.timeline)
        request = self.p2p.isend_backward(input_grad, self.first)
        if request is not None:
            self.sent_grads.append((i, request))

    def weight(self, i: int) -> None:
        """W(i): compute and accumulate the weight grads B(i) deferred."""
        start = time.perf_counter()
        self.store.run(i)
        if self.timeline is not None:
            self.timeline.record("weight", start, time.perf_counter())

    def finish(self) -> None:
        """Wait for the sends still in flight; every W must have run."""
        self._wait_grad_sends(up_to=self.m)
        if self.store.pending():
            raise RuntimeError(f"ZB-H1: the W of micro-batches {self.store.pending()} never ran")

    def _wait_grad_sends(self, up_to: int) -> None:
        while self.sent_grads and self.sent_grads[0][0] <= up_to:
            self.sent_grads.popleft()[1].wait()


def zb_h1(step_fn, model, microbatches, grad_scale: float, p2p: P2P, forward_only: bool = False,
          timeline=None, **_):
    """ZB-H1: 1F1B's warmup, then each backward split into B and W, rank ``r`` running
    ``W(i - r)`` after ``B(i)`` (same contract as
    :func:`~megalite.pipeline_parallel.schedules.one_f_one_b`)."""
    run = _ZeroBubbleRun(step_fn, model, microbatches, grad_scale, p2p, timeline)
    if forward_only:  # nothing to split: forwards in order, as 1F1B
        for mb in microbatches:
            output = forward_step(step_fn, run.chunk, mb, p2p.recv_forward(run.first), run.last, grad_scale,
                                  run.losses, timeline)
            p2p.send_forward(output, run.last)
        return run.losses
    m, lag, num_warmup = run.m, run.rank, run.num_warmup()
    with run.store.attached(model):
        # Warmup: forwards only, filling the pipeline.
        for i in range(num_warmup):
            run.forward(i)
        # Steady state: one forward, one B (of the oldest micro-batch in flight), and the W
        # of the micro-batch `lag` B's older.
        for i in range(m - num_warmup):
            run.forward(num_warmup + i)
            run.backward(i)
            if i >= lag:
                run.weight(i - lag)
        # Cooldown: the B's of the warmup micro-batches, each with a W, then the W's held back.
        for i in range(m - num_warmup, m):
            run.backward(i)
            if i >= lag:
                run.weight(i - lag)
        for i in range(max(m - lag, 0), m):
            run.weight(i)
        run.finish()
    return run.losses
