"""Optimizers: fp32-main-weight AdamW (optionally sharded over DP), loss scaling, LR schedules."""
from __future__ import annotations

from ..config import Config
from ..distributed.grad_buffer import GradBuffer
from ..parallel_state import ParallelState
from .loss_scaler import DynamicLossScaler, LossScaler, build_loss_scaler
from .lr_scheduler import LRScheduler
from .mixed_precision import MixedPrecisionOptimizer, parameter_fragments


def build_optimizer(model_chunks, buffers: list[GradBuffer], pstate: ParallelState,
                    cfg: Config) -> MixedPrecisionOptimizer:
    """AdamW over this rank's fragments (whole params, or its DP shard with the distributed optimizer)."""
    t = cfg.training
    return MixedPrecisionOptimizer(
        model_chunks, buffers, pstate, lr=t.lr, weight_decay=t.weight_decay, betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps, clip_grad=t.clip_grad, scaler=build_loss_scaler(t.fp16, t.loss_scale, t.initial_loss_scale),
        distributed=cfg.parallel.use_distributed_optimizer)


__all__ = ["build_optimizer", "MixedPrecisionOptimizer", "LRScheduler", "LossScaler", "DynamicLossScaler",
           "parameter_fragments"]
