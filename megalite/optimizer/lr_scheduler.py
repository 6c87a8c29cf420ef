"""Learning-rate schedules with linear warmup, as Megatron's OptimizerParamScheduler."""
from __future__ import annotations

import math


class LRScheduler:
    """``lr(step)``: linear warmup from 0 over ``warmup_steps``, then constant / linear / cosine /
    WSD (warmup-stable-decay: constant, then a linear anneal over the last ``wsd_decay_steps``)
    decay from ``max_lr`` to ``min_lr`` at ``decay_steps``; ``min_lr`` afterwards.

    Iteration ``i`` (1-based) trains with ``lr(i - 1)``, as in Megatron.
    """

    STYLES = ("constant", "linear", "cosine", "WSD")

    def __init__(self, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
                 style: str = "cosine", wsd_decay_steps: int | None = None):
        if style not in self.STYLES:
            raise ValueError(f"--lr-decay-style must be one of {self.STYLES}, got {style!r}")
        if min_lr > max_lr:
            raise ValueError(f"--min-lr {min_lr} is larger than --lr {max_lr}")
        self.max_lr, self.min_lr, self.style = max_lr, min_lr, style
        self.warmup_steps, self.decay_steps = warmup_steps, max(decay_steps, warmup_steps)
        self.wsd_decay_steps = wsd_decay_steps or max(1, (self.decay_steps - warmup_steps) // 10)
        self.num_steps = 0

    def lr(self, step: int | None = None) -> float:
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
            coeff = 1.0 if step <= anneal_start else 1.0 - (step - anneal_start) / self.wsd_decay_steps
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, optimizer) -> float:
        """Set ``optimizer``'s lr for the coming iteration and advance; returns that lr."""
        lr = self.lr()
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.num_steps += 1
        return lr

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "max_lr": self.max_lr, "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps, "style": self.style}

    def load_state_dict(self, state: dict) -> None:
        self.num_steps = state["num_steps"]
