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
from .schedules import backward_step, forward_step, free_output


def interleaved_one_f_one_b(step_fn, model, microbatches, grad_scale: float, p2p: P2P,
                            forward_only: bool = False, timeline=None, **_):
    """Interleaved 1F1B over the model chunks ``model`` of this rank (same contract as
    :func:`~megalite.pipeline_parallel.schedules.one_f_one_b`)."""
    ps = p2p.pstate
    pp, rank, chunks, m = ps.pp_size, ps.pp_rank, len(model), len(microbatches)
    if m % pp:
        raise ValueError(f"the interleaved pipeline schedule needs the number of micro-batches ({m}) "
                         f"to be a multiple of the pipeline-parallel size ({pp})")
    total = m * chunks
    if forward_only or m == pp:  # m == pp: all forwards, then all backwards (as Megatron-Core)
        num_warmup = total
    else:
        num_warmup = min((pp - rank - 1) * 2 + (chunks - 1) * pp, total)
    num_steady = total - num_warmup
    losses: list = []
    in_flight = [deque() for _ in model]  # per chunk: (input, output) forwarded, not yet backwarded

    def chunk_of(k: int, forward: bool) -> int:
        v = (k % (pp * chunks)) // pp
        return v if forward else chunks - 1 - v

    def first(v: int) -> bool:
        return ps.is_pipeline_first_stage(vp_rank=v)

    def last(v: int) -> bool:
        return ps.is_pipeline_last_stage(vp_rank=v)

    def needs_input(k: int) -> bool:
        """Forward ``k`` exists and takes its input from another rank."""
        return k < total and not first(chunk_of(k, True))

    def needs_grad(k: int) -> bool:
        """Backward ``k`` exists and takes its output grad from another rank."""
        return not forward_only and k < total and not last(chunk_of(k, False))

    def run_forward(k: int, input_tensor):
        """Forward ``k``; return the output to send on (None on the last virtual stage)."""
        v = chunk_of(k, True)
        mb = microbatches[(k // (pp * chunks)) * pp + k % pp]
        output = forward_step(step_fn, model[v], mb, input_tensor, last(v), grad_scale, losses, timeline)
        if not forward_only:
            in_flight[v].append((input_tensor, output))
        return None if last(v) else output

    def run_backward(k: int, output_grad):
        """Backward ``k``; return the input grad to send back (None on the first virtual stage)."""
        v = chunk_of(k, False)
        input_tensor, output = in_flight[v].popleft()
        input_grad = backward_step(input_tensor, output, output_grad, timeline)
        return None if first(v) else input_grad

    def exchange(output=None, input_grad=None, recv_input=False, recv_grad=False):
        """One batched send/recv; frees the sent output (its graph stays for the backward)."""
        received = p2p.communicate(send_next=output, recv_prev=recv_input,
                                   send_prev=input_grad, recv_next=recv_grad)
        if output is not None:
            free_output(output)
        return received

    # Warmup: forwards only. The last warmup exchange also fetches the first backward's grad.
    input_tensor, _ = exchange(recv_input=needs_input(0))
    output_grad = None
    for k in range(num_warmup):
        output = run_forward(k, input_tensor)
        fetch_grad = k == num_warmup - 1 and num_steady > 0 and needs_grad(0)
        input_tensor, output_grad = exchange(output, recv_input=needs_input(k + 1), recv_grad=fetch_grad)

    # Steady state: forward k + num_warmup, backward k, then one exchange for both directions.
    for k in range(num_steady):
        output = run_forward(num_warmup + k, input_tensor)
        input_grad = run_backward(k, output_grad)
        input_tensor, output_grad = exchange(output, input_grad, recv_input=needs_input(num_warmup + k + 1),
                                             recv_grad=needs_grad(k + 1))

    # Cooldown: the remaining backwards (all of them after an all-forward warmup).
    if not forward_only and num_steady == 0:
        _, output_grad = exchange(recv_grad=needs_grad(0))
    for k in range(num_steady, total if not forward_only else 0):
        input_grad = run_backward(k, output_grad)
        _, output_grad = exchange(input_grad=input_grad, recv_grad=needs_grad(k + 1))
    return losses
