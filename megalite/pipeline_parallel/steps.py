"""The two steps every schedule is made of: one forward and one backward of one model chunk
on one micro-batch, plus freeing a sent activation.

Kept apart from the schedules so that each schedule module (``schedules.py``,
``interleaved.py``, ``zb_h1.py``) depends on this one and none on another (``schedules.py``
only imports the others' entry points for ``get_schedule``). The contract:

* ``step_fn(chunk, microbatch) -> (output, loss_fn)``: runs a model chunk on one micro-batch;
  on the last stage ``loss_fn(output) -> (loss_sum, num_tokens)``.
* The loss that is back-propagated is ``loss_sum * grad_scale``; the trainer passes
  ``grad_scale = loss_scale / tokens in the global batch``, so the gradient is that of the
  mean over all tokens of the global batch whatever the micro-batch, DP or PP layout.
* ``losses`` collects ``(loss_sum, num_tokens)`` per micro-batch on the last stage.
"""
from __future__ import annotations

import time
from typing import Callable

import torch


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
