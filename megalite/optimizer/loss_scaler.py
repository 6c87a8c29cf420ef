"""Loss scaling for fp16: constant, or dynamic (back off on inf/nan, grow after a clean window)."""
from __future__ import annotations


class LossScaler:
    """Scale 1.0 and never skips: fp32 and bf16 training."""

    dynamic = False

    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = state["scale"]


class DynamicLossScaler(LossScaler):
    """Megatron's dynamic scaler: after ``hysteresis`` overflowing steps the scale is multiplied
    by ``backoff`` (not below ``min_scale``); after ``window`` clean steps by ``growth``."""

    dynamic = True

    def __init__(self, initial_scale: float = 2.0 ** 32, min_scale: float = 1.0, growth: float = 2.0,
                 backoff: float = 0.5, window: int = 1000, hysteresis: int = 2):
        super().__init__(initial_scale)
        self.min_scale, self.growth, self.backoff = min_scale, growth, backoff
        self.window, self.hysteresis = window, hysteresis
        self.hysteresis_left, self.clean_steps = hysteresis, 0

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.clean_steps = 0
            self.hysteresis_left -= 1
            if self.hysteresis_left <= 0:
                self.scale = max(self.scale * self.backoff, self.min_scale)
            return
        self.clean_steps += 1
        if self.clean_steps == self.window:
            self.clean_steps, self.hysteresis_left = 0, self.hysteresis
            self.scale *= self.growth

    def state_dict(self) -> dict:
        return {"scale": self.scale, "hysteresis_left": self.hysteresis_left, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = state["scale"]
        self.hysteresis_left, self.clean_steps = state["hysteresis_left"], state["clean_steps"]


def build_loss_scaler(fp16: bool, loss_scale: float | None, initial_loss_scale: float) -> LossScaler:
    """``--fp16``: constant ``--loss-scale`` if given, else dynamic from ``--initial-loss-scale``."""
    if not fp16:
        return LossScaler(1.0)
    if loss_scale is not None:
        return LossScaler(loss_scale)
    return DynamicLossScaler(initial_loss_scale)
