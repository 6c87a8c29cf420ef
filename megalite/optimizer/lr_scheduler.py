"""Learning-rate schedules with linear warmup, as Megatron's OptimizerParamScheduler.

The schedule is a function of the number of *successful* updates so far (``num_steps``):
as in Megatron, an iteration whose update is skipped (fp16 overflow, non-finite grads, no
loss tokens) does not advance it. Iteration ``i`` with no skipped iteration before it trains
with ``lr(i - 1)``, so with warmup the first iteration's lr is 0, as in Megatron.
"""
from __future__ import annotations

import math


def wsd_anneal_coeff(ratio: float, style: str) -> float:
    """Megatron's WSD annealing shapes: 1 at ``ratio`` 0, 0 at ``ratio`` 1."""
    if style == "linear":
        return 1.0 - ratio
    if style == "cosine":
        return 0.5 * (math.cos(math.pi * ratio) + 1.0)
    if style == "exponential":
        return 2.0 * math.pow(0.5, ratio) - 1.0
    return 1.0 - math.sqrt(ratio)  # minus_sqrt


class LRScheduler:
    """``lr(step)``: linear warmup from 0 over ``warmup_steps``, then constant / linear / cosine /
    WSD (warmup-stable-decay: constant, then an anneal of shape ``wsd_decay_style`` over the
    last ``wsd_decay_steps``) decay from ``max_lr`` to ``min_lr`` at ``decay_steps``; ``min_lr``
    afterwards.
    """

    STYLES = ("constant", "linear", "cosine", "WSD")
    WSD_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")

    def __init__(self, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
                 style: str = "cosine", wsd_decay_steps: int | None = None, wsd_decay_style: str = "exponential"):
        if style not in self.STYLES:
            raise ValueError(f"--lr-decay-style must be one of {self.STYLES}, got {style!r}")
        if wsd_decay_style not in self.WSD_STYLES:
            raise ValueError(f"--lr-wsd-decay-style must be one of {self.WSD_STYLES}, got {wsd_decay_style!r}")
        if min_lr > max_lr:
            raise ValueError(f"--min-lr {min_lr} is larger than --lr {max_lr}")
        self.max_lr, self.min_lr, self.style, self.wsd_decay_style = max_lr, min_lr, style, wsd_decay_style
        self.warmup_steps, self.decay_steps = warmup_steps, max(decay_steps, warmup_steps)
        self.wsd_decay_steps = wsd_decay_steps or max(1, (self.decay_steps - warmup_steps) // 10)
        self.num_steps = 0

    def lr(self, step: int | None = None) -> float:
        """The learning rate after ``step`` successful updates (default: the current count)."""
        step = self.num_steps if step is None else step
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.max_lr * step / self.warmup_steps
        if self.style == "constant":
            return self.max_lr
        if step > self.decay_steps:
            return self.min_lr
        ratio = (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps)
        if self.style == "linear":
            coeff = 1.0 - ratio
        elif self.style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:  # WSD
            anneal_start = self.decay_steps - self.wsd_decay_steps
            coeff = (1.0 if step <= anneal_start
                     else wsd_anneal_coeff((step - anneal_start) / self.wsd_decay_steps, self.wsd_decay_style))
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def apply(self, optimizer) -> float:
        """Set ``optimizer``'s lr for the coming iteration; returns that lr."""
        lr = self.lr()
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def advance(self) -> None:
        """Count one successful update (call only when the optimizer did update)."""
        self.num_steps += 1

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        self.num_steps = state["num_steps"]
