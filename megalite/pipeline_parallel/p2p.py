"""Point-to-point exchange of activations and gradients between adjacent pipeline stages.

Everything goes through :meth:`P2P.communicate`, one batched ``isend/irecv`` of up to four
operations. The operations are always posted in the same order on every rank::

    send to next (activation), recv from prev (activation),
    send to prev (gradient),   recv from next (gradient)

and activations and gradients use different tags. So between two ranks the k-th activation
sent is the k-th activation received, also when "next" and "prev" are the same rank (PP=2,
where Megatron-Core's order pairs an activation with a gradient over gloo and deadlocks or
corrupts). Shapes are known in advance (sequence x micro-batch x hidden), so no shape exchange;
a tensor of another shape or dtype is refused before anything is posted (see ``_check``).

ZB-H1 (``zb_h1.py``) posts its sends with :meth:`P2P.isend_forward` / :meth:`P2P.isend_backward`
instead, which return at once with a :class:`SendRequest` to wait on later, and receives with
the blocking ``recv_*``; the tags and the per-pair order are the same.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..parallel_state import ParallelState

ACTIVATION_TAG, GRADIENT_TAG = 1, 2


class P2P:
    """Send/recv helpers for one rank of a pipeline; optional timeline records each exchange."""

    def __init__(self, pstate: ParallelState, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, timeline=None):
        self.pstate, self.shape, self.dtype, self.device = pstate, tuple(shape), dtype, device
        self.timeline = timeline

    def communicate(self, send_next: torch.Tensor | None = None, recv_prev: bool = False,
                    send_prev: torch.Tensor | None = None, recv_next: bool = False):
        """Post the requested sends/recvs together; return ``(from_prev, from_next)``."""
        ps = self.pstate
        for what, tensor in (("activation to the next stage", send_next), ("gradient to the previous stage", send_prev)):
            self._check(what, tensor)
        from_prev = self._buffer() if recv_prev else None
        from_next = self._buffer() if recv_next else None
        ops = []
        if send_next is not None:
            ops.append(dist.P2POp(dist.isend, send_next.contiguous(), ps.next_pp_rank, tag=ACTIVATION_TAG))
        if from_prev is not None:
            ops.append(dist.P2POp(dist.irecv, from_prev, ps.prev_pp_rank, tag=ACTIVATION_TAG))
        if send_prev is not None:
            ops.append(dist.P2POp(dist.isend, send_prev.contiguous(), ps.prev_pp_rank, tag=GRADIENT_TAG))
        if from_next is not None:
            ops.append(dist.P2POp(dist.irecv, from_next, ps.next_pp_rank, tag=GRADIENT_TAG))
        if ops:
            start = time.perf_counter()
            for request in dist.batch_isend_irecv(ops):
                request.wait()
            if self.timeline is not None:
                self.timeline.record("comm", start, time.perf_counter())
        if from_prev is not None:
            from_prev.requires_grad_(True)  # the stage's input: its grad is sent back later
        return from_prev, from_next

    def _check(self, what: str, tensor: torch.Tensor | None) -> None:
        """The receiver posts a buffer of ``self.shape``: gloo aborts on a larger message and fills
        a larger buffer only partly, silently. So refuse to send anything else, before posting."""
        if tensor is not None and (tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype):
            raise ValueError(f"pipeline stage {self.pstate.pp_rank}: {what} has shape {tuple(tensor.shape)} "
                             f"{tensor.dtype}, but the other stage receives {self.shape} {self.dtype} "
                             "([seq / CP (/ TP with --sequence-parallel), micro-batch, hidden]): samples must "
                             "hold --seq-length + 1 tokens and every stage must return [s, b, h]")

    def _buffer(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)

    # Named one-way and two-way exchanges (the vocabulary of the schedules) ------------------
    def recv_forward(self, first_stage: bool):
        """This stage's input activation from the previous stage (None on the first stage)."""
        return None if first_stage else self.communicate(recv_prev=True)[0]

    def send_forward(self, output: torch.Tensor, last_stage: bool) -> None:
        """Send this stage's output to the next stage (nothing on the last stage)."""
        if not last_stage:
            self.communicate(send_next=output)

    def recv_backward(self, last_stage: bool):
        """The grad of this stage's output from the next stage (None on the last stage)."""
        return None if last_stage else self.communicate(recv_next=True)[1]

    def send_backward(self, input_grad: torch.Tensor | None, first_stage: bool) -> None:
        """Send the grad of this stage's input to the previous stage (nothing on the first)."""
        if not first_stage:
            self.communicate(send_prev=input_grad)

    def send_forward_recv_backward(self, output: torch.Tensor, last_stage: bool):
        """:meth:`send_forward` and :meth:`recv_backward` in one batched exchange."""
        return None if last_stage else self.communicate(send_next=output, recv_next=True)[1]

    def send_backward_recv_forward(self, input_grad: torch.Tensor | None, first_stage: bool):
        """:meth:`send_backward` and :meth:`recv_forward` in one batched exchange."""
        return None if first_stage else self.communicate(send_prev=input_grad, recv_prev=True)[0]

    # Sends that do not wait (zb_h1.py) ----------------------------------------------------
    def isend_forward(self, output: torch.Tensor, last_stage: bool):
        """Post the send of this stage's output to the next stage and return at once: a request
        to ``wait()`` on once the output has surely arrived (None on the last stage)."""
        if last_stage:
            return None
        self._check("activation to the next stage", output)
        return self._isend(output, self.pstate.next_pp_rank, ACTIVATION_TAG)

    def isend_backward(self, input_grad: torch.Tensor | None, first_stage: bool):
        """Post the send of the grad of this stage's input to the previous stage; as :meth:`isend_forward`."""
        if first_stage:
            return None
        self._check("gradient to the previous stage", input_grad)
        return self._isend(input_grad, self.pstate.prev_pp_rank, GRADIENT_TAG)

    def _isend(self, tensor: torch.Tensor, peer: int, tag: int) -> "SendRequest":
        # A tensor object of its own (detach): free_output(tensor) may swap the storage of the
        # original at once, while gloo still reads this one.
        data = tensor.detach().contiguous()
        return SendRequest(dist.isend(data, peer, tag=tag), data, self.timeline)


class SendRequest:
    """A posted send: holds its data until :meth:`wait`, which records the wait as ``comm``."""

    def __init__(self, work, data: torch.Tensor, timeline=None):
        self.work, self.data, self.timeline = work, data, timeline

    def wait(self) -> None:
        if self.work is None:  # waited already (a gloo send work must be waited only once)
            return
        start = time.perf_counter()
        self.work.wait()
        self.work = self.data = None
        if self.timeline is not None:
            self.timeline.record("comm", start, time.perf_counter())
