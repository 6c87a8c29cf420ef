"""When to save a checkpoint and when to stop, decided the same way on every rank."""
from __future__ import annotations

import signal
from dataclasses import dataclass

import torch

from ..config import Config
from ..optimizer.nonfinite import any_rank


@dataclass(frozen=True)
class Decision:
    """What to do after an iteration: save a checkpoint, and stop (``exit_reason`` set)."""
    save: bool
    exit_reason: str | None


class StopConditions:
    """``--save-interval``, ``--exit-interval`` and SIGTERM with ``--exit-signal-handler``.

    A signal reaches each rank on its own; :meth:`poll` agrees on it with one collective, so
    that every rank saves and stops after the same iteration.
    """

    def __init__(self, cfg: Config, device=torch.device("cpu")):
        self.cfg, self.device, self.signalled = cfg, device, False
        if cfg.logging.exit_signal_handler:
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signalled = True

    def poll(self, iteration: int) -> Decision:
        """The decision after ``iteration`` (collective when ``--exit-signal-handler`` is on)."""
        lg = self.cfg.logging
        signalled = lg.exit_signal_handler and any_rank(self.signalled, self.device)
        at_exit_interval = bool(lg.exit_interval) and iteration % lg.exit_interval == 0
        reason = (f"--exit-interval {lg.exit_interval}" if at_exit_interval else "SIGTERM" if signalled else None)
        save = bool(lg.save_interval and iteration % lg.save_interval == 0) or reason is not None
        return Decision(save=save, exit_reason=reason)
