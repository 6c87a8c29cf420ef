"""Optimizers: AdamW with Megatron's weight-decay groups, LR schedules, grad clipping."""
from __future__ import annotations

import torch

from ..config import Config


def param_groups(model_chunks, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay; biases and norm params (1-D) without, as Megatron."""
    decay, no_decay = [], []
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model_chunks, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over the parameters of this rank's model chunks."""
    t = cfg.training
    return torch.optim.AdamW(param_groups(model_chunks, t.weight_decay), lr=t.lr,
                             betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
