"""Cross entropy over vocab-parallel logits, without gathering the full vocabulary.

Each TP rank holds logits for its slice of the (padded) vocabulary. Three all-reduces over
the TP group (max, target logit, sum of exponentials) give the exact, numerically stable
loss; the backward is ``softmax - one_hot`` computed locally. Columns at or beyond the real
``vocab_size`` (padding) are excluded from the softmax, so padding never changes the loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .mappings import group_rank, group_size


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_size):
        part = logits.shape[-1]
        start = group_rank(group) * part
        logits = logits.float()
        if vocab_size is not None and start + part > vocab_size:
            padded = torch.arange(start, start + part, device=logits.device) >= vocab_size
            logits = logits.masked_fill(padded, float("-inf"))
        logits_max = _all_reduce(logits.amax(dim=-1), group, dist.ReduceOp.MAX)
        logits = logits - logits_max.unsqueeze(-1)            # a fresh tensor: safe to modify

        outside = (target < start) | (target >= start + part)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = _all_reduce(target_logit.masked_fill(outside, 0.0), group)

        exp_logits = logits.exp_()
        sum_exp = _all_reduce(exp_logits.sum(dim=-1), group)
        loss = torch.log(sum_exp) - target_logit

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, outside, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, outside, local_target = ctx.saved_tensors
        # In place, as Megatron: the softmax is ours and backward runs once (no retain_graph); a
        # copy would be one more pass over [tokens, vocab] floats (~5 % of a small model's step).
        grad = softmax
        grad.scatter_add_(-1, local_target.unsqueeze(-1), (outside.to(grad.dtype) - 1.0).unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None,
                                 vocab_size: int | None = None) -> torch.Tensor:
    """Per-token cross entropy (fp32) of vocab-parallel ``logits [..., V/tp]`` against ``target [...]``.

    ``vocab_size`` is the real vocabulary; padded columns beyond it are masked out.
    """
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group, vocab_size)
