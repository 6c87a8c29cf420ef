"""The B/W split of zero-bubble pipeline schedules (``pipeline_parallel/zb_h1.py``).

A backward is split into B, the grads of the inputs (what the previous pipeline stage waits
for), and W, the grads of the linears' weights (what only the optimizer step needs). While a
:class:`WeightGradStore` is attached to a weight, the tensor-parallel linears of ``layers.py``
(column, row, output layer) run through :class:`_LinearWithDeferredWeightGrad`, whose backward
computes the input and bias grads and hands the store a function that computes the weight
grad; the schedule calls it when it runs W. Everything else (norms, embeddings, attention, the
loss) back-propagates with autograd in B.
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from .mappings import _gather_first_dim, _reduce_scatter_first_dim


class WeightGradStore:
    """The weight grads that the linears defer while a zero-bubble schedule runs B.

    The schedule attaches a store to its model chunks' parameters (:meth:`attached`), runs the
    backward of micro-batch ``key`` inside ``capture(key)`` and later ``run(key)``. ``run``
    computes the deferred grads and hands each parameter's to autograd's AccumulateGrad
    (:func:`_accumulate`), so grad hooks (the grad buffer's, and with them bucket readiness
    under ``--overlap-grad-reduce``) fire as in a plain backward, once per parameter and
    micro-batch, only later. Outside ``capture`` a deferred grad is accumulated at once: a plain
    backward (evaluation, or a backward that is not the schedule's).
    """

    def __init__(self):
        self._deferred: dict = {}            # key -> [(param, compute)] of a B whose W has not run
        self._capturing: list | None = None  # filled by the B running now

    @contextlib.contextmanager
    def attached(self, model_chunks):
        """Attach the store to every trainable parameter of ``model_chunks`` for the block."""
        params = [p for chunk in model_chunks for p in chunk.parameters() if p.requires_grad]
        for p in params:
            p.weight_grad_store = self
        try:
            yield self
        finally:
            for p in params:
                del p.weight_grad_store

    @contextlib.contextmanager
    def capture(self, key):
        """Run B of micro-batch ``key`` in this block: the weight grads it defers wait for W."""
        if key in self._deferred or self._capturing is not None:
            raise RuntimeError(f"B of micro-batch {key} runs twice or inside another B")
        self._capturing = []
        try:
            yield
        finally:
            self._deferred[key], self._capturing = self._capturing, None

    def defer(self, param: torch.Tensor, compute: Callable[[], torch.Tensor]) -> None:
        """``compute()`` gives ``param``'s grad: keep it for W inside ``capture``, else accumulate now."""
        if self._capturing is None:
            _accumulate(param, [compute])
        else:
            self._capturing.append((param, compute))

    def run(self, key) -> None:
        """W of micro-batch ``key``: compute and accumulate its weight grads, in B's order.

        A weight used twice in the micro-batch gets the sum of its grads in one accumulation,
        as from autograd: the grad buffer counts one hook per parameter and micro-batch before
        it starts a bucket's reduction."""
        if key not in self._deferred:
            raise RuntimeError(f"W of micro-batch {key} before its B, or a second time")
        by_param: dict[int, tuple[torch.Tensor, list]] = {}
        for param, compute in self._deferred.pop(key):
            by_param.setdefault(id(param), (param, []))[1].append(compute)
        for param, computes in by_param.values():
            _accumulate(param, computes)

    def pending(self) -> list:
        """Micro-batches whose B has run but not their W."""
        return sorted(self._deferred)


class _DeferredGrad(torch.autograd.Function):
    """A one-node graph whose backward is the sum of ``computes()``, the grad of ``param``."""

    @staticmethod
    def forward(ctx, param, computes):
        ctx.computes = computes
        return param.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        grad = ctx.computes[0]()
        for compute in ctx.computes[1:]:
            grad = grad + compute()
        return grad, None


def _accumulate(param: torch.Tensor, computes: list) -> None:
    """Give the grad to ``param``'s AccumulateGrad as the linear's own backward would: grad hooks
    fire, and the fresh grad is taken without a copy (``torch.autograd.backward(param, grad)``
    would copy it, as the caller still holds it)."""
    with torch.enable_grad():
        out = _DeferredGrad.apply(param, computes)
    out.backward()


def store_of(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> WeightGradStore | None:
    """The store attached to ``weight`` if its grad is to be deferred: a backward may follow and
    reaches the linear through ``x`` or ``bias`` (the weight itself is hidden from autograd)."""
    store = getattr(weight, "weight_grad_store", None)
    if store is None or not (weight.requires_grad and torch.is_grad_enabled()):
        return None
    return store if x.requires_grad or (bias is not None and bias.requires_grad) else None


def _weight_grad(grad2d: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return grad2d.t().matmul(total.reshape(-1, total.shape[-1]))


class _LinearWithDeferredWeightGrad(torch.autograd.Function):
    """``x @ W.T + b`` (``x`` all-gathered along the sequence first when ``sp_group`` is given)
    whose backward returns the input and bias grads (B) and hands the weight grad to ``store``.

    The weight comes in a tuple, out of autograd's sight: an input whose grad is returned as
    None would still fire its grad hooks (with no grad). The forward and both halves of the
    backward are the operations of ``F.linear``'s autograd (or of ``layers._SequenceParallelLinear``),
    so the grads are bit-identical to a plain backward's (``tests/test_zb_h1.py``)."""

    @staticmethod
    def forward(ctx, x, bias, weight_box, store, sp_group):
        (weight,) = weight_box
        ctx.weight, ctx.store, ctx.sp_group, ctx.has_bias = weight, store, sp_group, bias is not None
        ctx.save_for_backward(x)
        return F.linear(x if sp_group is None else _gather_first_dim(x, sp_group), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad_input = grad.matmul(ctx.weight)
        total = x
        if ctx.sp_group is not None:  # as _SequenceParallelLinear; the gathered input waits for W
            grad_input = _reduce_scatter_first_dim(grad_input, ctx.sp_group)
            total = _gather_first_dim(x, ctx.sp_group)
        grad2d = grad.reshape(-1, grad.shape[-1])
        ctx.store.defer(ctx.weight, partial(_weight_grad, grad2d, total))
        grad_bias = grad2d.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return grad_input, grad_bias, None, None, None


def deferred_linear(x, weight, bias, store: WeightGradStore, sp_group=None) -> torch.Tensor:
    """The linear whose weight grad ``store`` defers; ``sp_group``: all-gather ``x`` along the
    sequence first (sequence parallelism)."""
    return _LinearWithDeferredWeightGrad.apply(x, bias, (weight,), store, sp_group)
