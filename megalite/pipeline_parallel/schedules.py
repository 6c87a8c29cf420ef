"""Forward/backward schedules over the micro-batches of one global batch.

All schedules share two step functions, :func:`forward_step` and :func:`backward_step`, and
the same contract:

* ``step_fn(chunk, microbatch) -> (output, loss_fn)``: runs a model chunk on one micro-batch;
  on the last stage ``loss_fn(output) -> (loss_sum, num_tokens)``.
* The loss that is back-propagated is ``loss_sum * grad_scale``; the trainer passes
  ``grad_scale = loss_scale / tokens in the global batch``, so the gradient is that of the
  mean over all tokens of the global batch whatever the micro-batch, DP or PP layout.
* The return value is the list of ``(loss_sum, num_tokens)`` per micro-batch on the last
  stage, empty elsewhere.

:func:`forward_backward_no_pipelining` is plain gradient accumulation; :func:`gpipe` runs all
forwards then all backwards; :func:`one_f_one_b` is PipeDream-Flush 1F1B (warmup / steady /
cooldown); the interleaved variant lives in ``interleaved.py``.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from .p2p import P2P


def free_output(tensor: torch.Tensor) -> None:
    """Release an output activation's storage once it has been sent to the next stage; its
    autograd graph stays (see :func:`backward_step`). Megatron-Core does the same."""
    tensor.data = torch.empty((1,), device=tensor.device, dtype=tensor.dtype)


def forward_step(step_fn: Callable, chunk, microbatch, input_tensor, last_stage: bool,
                 grad_scale: float, losses: list, timeline=None):
    """Run one chunk on one micro-batch; on the last stage return the scaled loss to backprop."""
    start = time.perf_counter()
    chunk.set_input_tensor(input_tensor)
    output, loss_fn = step_fn(chunk, microbatch)
    if last_stage:
        loss_sum, num_tokens = loss_fn(output)
        losses.append((loss_sum.detach(), num_tokens))
        output = loss_sum * grad_scale
    if timeline is not None:
        timeline.record("forward", start, time.perf_counter())
    return output


def backward_step(input_tensor, output_tensor, output_grad, timeline=None):
    """Back-propagate ``output_grad`` through one stage; return the grad of its input."""
    start = time.perf_counter()
    if output_grad is None:  # last stage: output is the scalar loss
        output_tensor.backward()
    else:
        # The output's storage may have been freed after sending (free_output): call the engine
        # directly, which skips the shape check that torch.autograd.backward would do.
        torch.autograd.Variable._execution_engine.run_backward(
            tensors=(output_tensor,), grad_tensors=(output_grad,), keep_graph=False,
            create_graph=False, inputs=(), allow_unreachable=True, accumulate_grad=True)
    if timeline is not None:
        timeline.record("backward", start, time.perf_counter())
    return None if input_tensor is None else input_tensor.grad


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
    inputs, outputs = [], []  # in flight: forwarded, not yet backwarded

    def run_forward(index, input_tensor):
        output = forward_step(step_fn, chunk, microbatches[index], input_tensor, last, grad_scale, losses, timeline)
        return output

    # Warmup: forwards only, filling the pipeline.
    for i in range(num_warmup):
        input_tensor = p2p.recv_forward(first)
        output = run_forward(i, input_tensor)
        p2p.send_forward(output, last)
        if not forward_only:
            inputs.append(input_tensor)
            outputs.append(output)
            if not last:
                free_output(output)

    # Steady state: one forward, then one backward (of the oldest micro-batch in flight).
    input_tensor = p2p.recv_forward(first) if num_steady else None
    for i in range(num_steady):
        output = run_forward(num_warmup + i, input_tensor)
        output_grad = p2p.send_forward_recv_backward(output, last)
        inputs.append(input_tensor)
        outputs.append(output)
        if not last:
            free_output(output)
        input_grad = backward_step(inputs.pop(0), outputs.pop(0), output_grad, timeline)
        if i == num_steady - 1:
            p2p.send_backward(input_grad, first)
        else:
            input_tensor = p2p.send_backward_recv_forward(input_grad, first)

    # Cooldown: the backwards of the warmup micro-batches.
    while inputs and not forward_only:
        output_grad = p2p.recv_backward(last)
        input_grad = backward_step(inputs.pop(0), outputs.pop(0), output_grad, timeline)
        p2p.send_backward(input_grad, first)
    return losses


def get_schedule(pp_size: int, virtual_chunks: int = 1, name: str = "1f1b") -> Callable:
    """The schedule function for a layout: no pipelining, 1F1B (or GPipe), or interleaved."""
    if pp_size == 1:
        return forward_backward_no_pipelining
    if virtual_chunks > 1:
        from .interleaved import interleaved_one_f_one_b
        return interleaved_one_f_one_b
    return gpipe if name == "gpipe" else one_f_one_b
