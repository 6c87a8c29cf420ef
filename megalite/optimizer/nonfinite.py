"""Non-finite gradients never reach the weights, and a run does not train on NaN silently.

The optimizer skips every update whose global grad norm is inf/NaN (on all ranks together,
see :meth:`MixedPrecisionOptimizer.step`). :class:`NonFiniteStreak` then counts such
iterations in a row: each is logged with the first parameter (global name, model order)
whose grad is not finite, and the ``limit``-th in a row stops the run with
:class:`NonFiniteGradientsError`. While a streak lasts no checkpoint is written, so the last
checkpoint on disk predates the first non-finite step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class NonFiniteGradientsError(RuntimeError):
    """Too many iterations in a row had inf/NaN gradients (raised on every rank)."""


def any_rank(flag: bool, device=None) -> bool:
    """True on every rank when ``flag`` is true on any rank (a collective over the world)."""
    t = torch.tensor([float(flag)], device=device)  # NCCL reduces device tensors only
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class NonFiniteStreak:
    """Counts consecutive non-finite iterations; names the first bad parameter; stops the run.

    ``param_order`` maps ``id(param)`` to ``(position in the whole model, global name)``.
    """

    def __init__(self, param_order: dict[int, tuple[tuple, str]], limit: int, rank: int = 0):
        self.param_order, self.limit, self.rank = param_order, limit, rank
        self.length = 0          # non-finite iterations in a row so far
        self.first_iteration = 0  # where the current streak began
        self.first_param = ""

    @property
    def active(self) -> bool:
        """True while the latest iteration(s) had non-finite grads: nothing may be saved."""
        return self.length > 0

    def first_nonfinite_param(self, optimizer) -> str:
        """Global name of the first parameter in model order whose grad is not finite, agreed by
        all ranks (a collective: call it on every rank). Empty when no single grad is (the norm
        overflowed)."""
        mine = min((self.param_order[id(p)] for p in optimizer.nonfinite_params()), default=None)
        if dist.is_initialized() and dist.get_world_size() > 1:
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
            mine = min((x for x in everyone if x is not None), default=None)
        return mine[1] if mine else ""

    def record(self, iteration: int, nonfinite: bool, optimizer, log=print) -> None:
        """Account iteration ``iteration``; raise NonFiniteGradientsError at the limit."""
        if not nonfinite:
            self.length = 0
            return
        name = self.first_nonfinite_param(optimizer) or "(none alone: the sum of squares overflowed)"
        if self.length == 0:
            self.first_iteration, self.first_param = iteration, name
        self.length += 1
        if self.rank == 0:
            log(f"> iteration {iteration}: non-finite gradients (first in {name}); update skipped, "
                f"{self.length} in a row (the run stops at --max-consecutive-nan-iterations {self.limit})")
        if self.length >= self.limit:
            raise NonFiniteGradientsError(
                f"iteration {iteration}: {self.length} iterations in a row ({self.first_iteration} to "
                f"{iteration}) had non-finite gradients; the first non-finite gradient of iteration "
                f"{self.first_iteration} was in {self.first_param}. Their updates were skipped and no "
                f"checkpoint was written from iteration {self.first_iteration} on. Stopping "
                f"(--max-consecutive-nan-iterations {self.limit}).")
