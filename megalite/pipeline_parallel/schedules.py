"""Forward/backward schedules over the micro-batches of one global batch.

Every schedule is built from the steps in :mod:`.steps` (:func:`~.steps.forward_step`,
:func:`~.steps.backward_step`, :func:`~.steps.free_output`) and has the signature
``schedule(step_fn, model, microbatches, grad_scale, p2p, forward_only=False, timeline=None)``,
``model`` being the list of this rank's model chunks. It returns the list of
``(loss_sum, num_tokens)`` per micro-batch on the last stage, empty elsewhere.

:func:`forward_backward_no_pipelining` is plain gradient accumulation; :func:`gpipe` runs all
forwards then all backwards; :func:`one_f_one_b` is PipeDream-Flush 1F1B (warmup / steady /
cooldown); the interleaved variant lives in ``interleaved.py``, the zero-bubble ZB-H1 (backward
split into input and weight grads) in ``zb_h1.py``. :func:`get_schedule` picks one.
"""
from __future__ import annotations

from typing import Callable

from .interleaved import interleaved_one_f_one_b
from .p2p import P2P
from .steps import backward_step, forward_step, free_output
from .zb_h1 import zb_h1


def forward_backward_no_pipelining(step_fn, model, microbatches, grad_scale: float,
                                   forward_only: bool = False, timeline=None, **_):
    """Gradient accumulation on a single stage: forward+backward per micro-batch."""
    (chunk,) = model
    losses: list = []
    for mb in microbatches:
        loss = forward_step(step_fn, chunk, mb, None, True, grad_scale, losses, timeline)
        if not forward_only:
            backward_step(None, loss, None, timeline)
    return losses


def gpipe(step_fn, model, microbatches, grad_scale: float, p2p: P2P, forward_only: bool = False,
          timeline=None, **_):
    """All forwards, then all backwards (in reverse). Simple, but holds every micro-batch's
    activations at once; 1F1B holds at most ``pp`` of them."""
    (chunk,) = model
    ps = p2p.pstate
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    losses: list = []
    saved = []
    for mb in microbatches:
        input_tensor = p2p.recv_forward(first)
        output = forward_step(step_fn, chunk, mb, input_tensor, last, grad_scale, losses, timeline)
        p2p.send_forward(output, last)
        if not forward_only:
            if not last:
                free_output(output)
            saved.append((input_tensor, output))
    for input_tensor, output in reversed(saved) if not forward_only else ():
        output_grad = p2p.recv_backward(last)
        p2p.send_backward(backward_step(input_tensor, output, output_grad, timeline), first)
    return losses


def one_f_one_b(step_fn, model, microbatches, grad_scale: float, p2p: P2P, forward_only: bool = False,
                timeline=None, **_):
    """PipeDream-Flush 1F1B: ``pp - rank - 1`` warmup forwards, then alternate one forward and
    one backward, then drain the remaining backwards."""
    (chunk,) = model
    ps = p2p.pstate
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    m = len(microbatches)
    num_warmup = m if forward_only else min(ps.pp_size - ps.pp_rank - 1, m)
    num_steady = m - num_warmup
    losses: list = []
    in_flight = []  # (input, output) of micro-batches forwarded, not yet backwarded; oldest first

    def forward(i: int, input_tensor):
        """Forward micro-batch ``i``; returns the output (the scaled loss on the last stage)."""
        return forward_step(step_fn, chunk, microbatches[i], input_tensor, last, grad_scale, losses, timeline)

    def keep(input_tensor, output) -> None:
        """Hold a sent micro-batch for its backward; the output's values are no longer needed."""
        if not forward_only:
            in_flight.append((input_tensor, output))
            if not last:
                free_output(output)

    def backward_oldest(output_grad):
        """Backward of the oldest micro-batch in flight; returns the grad of its input."""
        return backward_step(*in_flight.pop(0), output_grad, timeline)

    # Warmup: forwards only, filling the pipeline.
    for i in range(num_warmup):
        input_tensor = p2p.recv_forward(first)
        output = forward(i, input_tensor)
        p2p.send_forward(output, last)
        keep(input_tensor, output)

    # Steady state: one forward, then one backward (of the oldest micro-batch in flight).
    input_tensor = p2p.recv_forward(first) if num_steady else None
    for i in range(num_steady):
        output = forward(num_warmup + i, input_tensor)
        output_grad = p2p.send_forward_recv_backward(output, last)
        keep(input_tensor, output)
        input_grad = backward_oldest(output_grad)
        if i == num_steady - 1:
            p2p.send_backward(input_grad, first)
        else:
            input_tensor = p2p.send_backward_recv_forward(input_grad, first)

    # Cooldown: the backwards of the warmup micro-batches.
    while in_flight:
        input_grad = backward_oldest(p2p.recv_backward(last))
        p2p.send_backward(input_grad, first)
    return losses


def get_schedule(pp_size: int, virtual_chunks: int = 1, name: str = "1f1b") -> Callable:
    """The schedule function for a layout: no pipelining, 1F1B (or GPipe, ZB-H1), or interleaved."""
    if name == "zb-h1" and (pp_size == 1 or virtual_chunks > 1):  # (config.py says so at start-up)
        raise ValueError("the zb-h1 pipeline schedule needs pipeline-parallel size > 1 and no virtual stages")
    if pp_size == 1:
        return forward_backward_no_pipelining
    if virtual_chunks > 1:
        return interleaved_one_f_one_b
    return {"gpipe": gpipe, "zb-h1": zb_h1}.get(name, one_f_one_b)
