"""The training log lines, in Megatron-LM's exact format (outside tools parse them)."""
from __future__ import annotations

import math


def format_iteration_line(iteration: int, train_iters: int, consumed_samples: int, elapsed_ms: float,
                          tflops_per_gpu: float, lr: float, global_batch_size: int, lm_loss: float,
                          loss_scale: float, grad_norm: float, skipped: int, nan: int,
                          extra: dict[str, float] | None = None) -> str:
    """`` iteration   10/  100 | consumed samples: ... | number of nan iterations:   0 |``, then
    ``extra`` figures (MoE models: ``load_balancing_loss``, ``z_loss``) as `` name: %E |``: after
    the fixed fields, so that a dense model's line is exactly Megatron's."""
    tail = "".join(f" {name}: {value:.6E} |" for name, value in (extra or {}).items())
    return (f" iteration {iteration:8d}/{train_iters:8d} |"
            f" consumed samples: {consumed_samples:11d} |"
            f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
            f" throughput per GPU (TFLOP/s/GPU): {_two_significant(tflops_per_gpu)} |"
            f" learning rate: {lr:.6E} |"
            f" global batch size: {global_batch_size:5d} |"
            f" lm loss: {lm_loss:.6E} |"
            f" loss scale: {loss_scale:.1f} |"
            f" grad norm: {grad_norm:.3f} |"
            f" number of skipped iterations: {skipped:3d} |"
            f" number of nan iterations: {nan:3d} |" + tail)


def format_validation_line(where: str, loss: float) -> str:
    """`` validation loss at iteration N | lm loss value: X | lm loss PPL: Y |``"""
    ppl = math.exp(min(20.0, loss))
    return f" validation loss at {where} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |"


def _two_significant(value: float) -> str:
    """One decimal from 1 up (as Megatron), else two significant digits, so that a CPU's small
    figure (0.0012) does not print as 0.0."""
    if not math.isfinite(value) or value == 0 or abs(value) >= 1:
        return f"{value:.1f}"
    return f"{value:.{1 - math.floor(math.log10(abs(value)))}f}"
