"""Interleaved 1F1B (Megatron's virtual pipeline stages).

Each pipeline rank holds ``V`` model chunks; chunk ``v`` of rank ``r`` is virtual stage
``v * pp + r``, so an activation goes round the ring of ranks ``V`` times (rank ``pp - 1``'s
chunk ``v`` feeds rank 0's chunk ``v + 1``; ``next``/``prev`` ranks wrap around). The bubble
shrinks by ``V``: ``(pp - 1) / (V * m)`` of the ideal time instead of ``(pp - 1) / m``.

Order of work (Megatron-Core's, with ``m`` a multiple of ``pp``): forwards are numbered
``k = 0 .. m*V - 1`` and run in groups of ``pp`` micro-batches per chunk::

    chunk(k) = (k % (pp*V)) // pp          micro-batch(k) = (k // (pp*V)) * pp + k % pp

backwards use the same numbering with the chunks reversed (``V - 1 - chunk``). Rank ``r``
first runs ``(pp - r - 1) * 2 + (V - 1) * pp`` warmup forwards (all of them when ``m == pp``),
then alternates one forward and one backward, then drains the remaining backwards.

Communication: after every forward (backward) one :meth:`P2P.communicate` call sends its
output (input grad) and receives the input (output grad) of the *next* forward (backward) of
this rank; in the steady state both go in the same call. Every rank follows the same rule, so
the k-th send between two ranks meets the k-th receive, and neighbours make their matching
calls at the same point of the pipeline's clock (no deadlock, also with PP=2 where ``next ==
prev``: activations and gradients travel with different tags).
"""
from __future__ import annotations

from collections import deque

from .p2p import P2P
from .steps import backward_step, forward_step, free_output


class _InterleavedRun:
    """One run of the schedule on this rank: the numbering of forwards/backwards ``k``, the
    activations in flight and the steps; :func:`interleaved_one_f_one_b` orders the calls."""

    def __init__(self, step_fn, model, microbatches, grad_scale: float, p2p: P2P, forward_only: bool,
                 timeline):
        ps = p2p.pstate
        self.pp, self.rank, self.chunks, self.m = ps.pp_size, ps.pp_rank, len(model), len(microbatches)
        # Checked before any communication, so a bad call fails here and not as a hang.
        if self.m % self.pp:
            raise ValueError(f"the interleaved pipeline schedule needs the number of micro-batches ({self.m}) "
                             f"to be a multiple of the pipeline-parallel size ({self.pp})")
        self.ps, self.p2p, self.model, self.microbatches = ps, p2p, model, microbatches
        self.step_fn, self.grad_scale, self.forward_only, self.timeline = step_fn, grad_scale, forward_only, timeline
        self.total = self.m * self.chunks
        self.losses: list = []
        self.in_flight = [deque() for _ in model]  # per chunk: (input, output) forwarded, not yet backwarded

    def num_warmup(self) -> int:
        """Forwards before the first backward (Megatron-Core's count)."""
        if self.forward_only or self.m == self.pp:  # m == pp: all forwards, then all backwards
            return self.total
        return min((self.pp - self.rank - 1) * 2 + (self.chunks - 1) * self.pp, self.total)

    def chunk_of(self, k: int, forward: bool) -> int:
        """The model chunk that forward (or backward) number ``k`` runs."""
        v = (k % (self.pp * self.chunks)) // self.pp
        return v if forward else self.chunks - 1 - v

    def first(self, v: int) -> bool:
        """Whether chunk ``v`` of this rank is the first virtual stage."""
        return self.ps.is_pipeline_first_stage(vp_rank=v)

    def last(self, v: int) -> bool:
        """Whether chunk ``v`` of this rank is the last virtual stage."""
        return self.ps.is_pipeline_last_stage(vp_rank=v)

    def needs_input(self, k: int) -> bool:
        """Forward ``k`` exists and takes its input from another rank."""
        return k < self.total and not self.first(self.chunk_of(k, True))

    def needs_grad(self, k: int) -> bool:
        """Backward ``k`` exists and takes its output grad from another rank."""
        return not self.forward_only and k < self.total and not self.last(self.chunk_of(k, False))

    def forward(self, k: int, input_tensor):
        """Forward ``k``; return the output to send on (None on the last virtual stage)."""
        v = self.chunk_of(k, True)
        mb = self.microbatches[(k // (self.pp * self.chunks)) * self.pp + k % self.pp]
        output = forward_step(self.step_fn, self.model[v], mb, input_tensor, self.last(v), self.grad_scale,
                              self.losses, self.timeline)
        if not self.forward_only:
            self.in_flight[v].append((input_tensor, output))
        return None if self.last(v) else output

    def backward(self, k: int, output_grad):
        """Backward ``k``; return the input grad to send back (None on the first virtual stage)."""
        v = self.chunk_of(k, False)
        input_tensor, output = self.in_flight[v].popleft()
        input_grad = backward_step(input_tensor, output, output_grad, self.timeline)
        return None if self.first(v) else input_grad

    def exchange(self, output=None, input_grad=None, recv_input=False, recv_grad=False):
        """One batched send/recv; frees the sent output (its graph stays for the backward)."""
        received = self.p2p.communicate(send_next=output, recv_prev=recv_input,
                                        send_prev=input_grad, recv_next=recv_grad)
        if output is not None:
            free_output(output)
        return received


def interleaved_one_f_one_b(step_fn, model, microbatches, grad_scale: float, p2p: P2P,
                            forward_only: bool = False, timeline=None, **_):
    """Interleaved 1F1B over the model chunks ``model`` of this rank (same contract as
    :func:`~megalite.pipeline_parallel.schedules.one_f_one_b`)."""
    run = _InterleavedRun(step_fn, model, microbatches, grad_scale, p2p, forward_only, timeline)
    total, num_warmup = run.total, run.num_warmup()
    num_steady = total - num_warmup

    # Warmup: forwards only. The last warmup exchange also fetches the first backward's grad.
    input_tensor, _ = run.exchange(recv_input=run.needs_input(0))
    output_grad = None
    for k in range(num_warmup):
        output = run.forward(k, input_tensor)
        fetch_grad = k == num_warmup - 1 and num_steady > 0 and run.needs_grad(0)
        input_tensor, output_grad = run.exchange(output, recv_input=run.needs_input(k + 1), recv_grad=fetch_grad)

    # Steady state: forward k + num_warmup, backward k, then one exchange for both directions.
    for k in range(num_steady):
        output = run.forward(num_warmup + k, input_tensor)
        input_grad = run.backward(k, output_grad)
        input_tensor, output_grad = run.exchange(output, input_grad, recv_input=run.needs_input(num_warmup + k + 1),
                                                 recv_grad=run.needs_grad(k + 1))

    # Cooldown: the remaining backwards (all of them after an all-forward warmup).
    if not forward_only and num_steady == 0:
        _, output_grad = run.exchange(recv_grad=run.needs_grad(0))
    for k in range(num_steady, total if not forward_only else 0):
        input_grad = run.backward(k, output_grad)
        _, output_grad = run.exchange(input_grad=input_grad, recv_grad=run.needs_grad(k + 1))
    return run.losses
