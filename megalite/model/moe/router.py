"""The MoE router: top-k expert choice, and the load-balancing and z losses, layout-invariant.

``TopKRouter(x)`` takes this rank's tokens ``[T, h]`` and returns, per token, the ``k`` chosen
experts and their weights (fp32), as Megatron-Core's ``topk_routing_with_score_function``:
``softmax`` scores (top-k of the logits, then a softmax over those k; or with ``pre_softmax``
the top-k of the softmax), or ``sigmoid`` scores normalised over the k chosen (with the
DeepSeek-V3 expert bias, added to the scores for the choice only).

The auxiliary losses are defined on a micro-batch, whatever the layout: its tokens may be
split over TP ranks (sequence parallel) and CP ranks, so the statistics (tokens per expert,
token count, and for the logged values the probability sums) are all-reduced over those groups
first. Each rank's part of the loss then only involves its own tokens' probabilities, and the
parts sum to the micro-batch's loss: the gradient is the serial one. The loss reaches the
backward through :class:`AttachAuxLoss` with the trainer's scale (``loss_scale / micro-batches
in the global batch``), so the objective is the LM loss plus the mean of the micro-batches'
auxiliary losses at every layout.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ...tensor_parallel import init_method_normal


class MoERecorder:
    """What one model chunk's MoE layers share with the trainer: the scale of the auxiliary
    losses' gradient (set each iteration) and, per micro-batch backward, what they measured."""

    def __init__(self):
        self.aux_scale = 1.0
        self.records: list[dict] = []  # {"layer", "aux", "z", "tokens_per_expert"}


class AttachAuxLoss(torch.autograd.Function):
    """Identity on ``probs``; its backward also back-propagates ``aux_loss`` with the recorder's
    scale, and records the layer's statistics (once per micro-batch, also under recompute)."""

    @staticmethod
    def forward(ctx, probs, aux_loss, recorder, record):
        ctx.recorder, ctx.record = recorder, record
        return probs.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.recorder.records.append(ctx.record)
        scale = torch.full((), ctx.recorder.aux_scale, dtype=torch.float32, device=grad.device)
        return grad, scale, None, None


def _all_reduce(x: torch.Tensor, groups) -> torch.Tensor:
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(x, group=group)
    return x


class TopKRouter(nn.Module):
    """Router weight ``[E, h]`` (replicated; under SP its grads are partial over TP)."""

    def __init__(self, cfg, recorder: MoERecorder, stat_groups: tuple, layer_number: int,
                 sequence_parallel: bool = False):
        super().__init__()
        self.cfg, self.recorder, self.stat_groups, self.layer_number = cfg, recorder, stat_groups, layer_number
        self.num_experts, self.topk = cfg.num_experts, cfg.moe_router_topk
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        init_method_normal(cfg.init_method_std)(self.weight)
        self.weight.sequence_parallel = sequence_parallel
        if cfg.moe_router_enable_expert_bias:  # DeepSeek-V3's aux-loss-free balancing (sigmoid scores)
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        else:
            self.expert_bias = None

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights [T, k], experts [T, k])`` from fp32 logits ``[T, E]``."""
        cfg, k = self.cfg, self.topk
        if cfg.moe_router_score_function == "softmax":
            if cfg.moe_router_pre_softmax:
                return torch.topk(torch.softmax(logits, dim=-1), k=k, dim=1)
            top, experts = torch.topk(logits, k=k, dim=1)
            return torch.softmax(top, dim=-1), experts
        scores = torch.sigmoid(logits)
        if self.expert_bias is not None:
            _, experts = torch.topk(scores + self.expert_bias, k=k, dim=1)
            top = torch.gather(scores, 1, experts)
        else:
            top, experts = torch.topk(scores, k=k, dim=1)
        return (top / (top.sum(dim=-1, keepdim=True) + 1e-20) if k > 1 else top), experts

    def aux_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The per-expert probabilities the load-balancing loss uses ``[T, E]``."""
        if self.cfg.moe_router_score_function == "softmax":
            return torch.softmax(logits, dim=-1)
        scores = torch.sigmoid(logits)
        return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)

    def forward(self, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` is ``[T, h]`` with ``T = s_local * batch`` tokens ordered ``[s, b]``."""
        logits = F.linear(x.float(), self.weight.float())  # the router runs in fp32
        weights, experts = self.route(logits)
        if self.training and torch.is_grad_enabled():  # (also without a loss: the record is made in backward)
            load = F.one_hot(experts, self.num_experts).sum(dim=1).float()  # [T, E] 0/1: the routing
            # The balancing loss counts the top-k of the unbiased scores (as Megatron-Core's
            # compute_routing_scores_for_aux_loss): the same choice unless an expert bias is on.
            counts = load if self.expert_bias is None else F.one_hot(
                torch.topk(self.aux_scores(logits), k=self.topk, dim=1).indices, self.num_experts).sum(dim=1).float()
            loss, record = self._losses(logits, counts, load, batch)
            weights = AttachAuxLoss.apply(weights, loss, self.recorder, record)
        return weights, experts

    def _losses(self, logits, counts, load, batch: int):
        """This rank's part of the micro-batch's aux + z loss (with grad), and the logged values."""
        cfg, E = self.cfg, self.num_experts
        seq = logits.shape[0] // batch
        per_seq = cfg.moe_router_load_balancing_type == "seq_aux_loss"
        groups = (lambda t: t.view(seq, batch, -1).sum(0)) if per_seq else (lambda t: t.sum(0, keepdim=True))
        scores = self.aux_scores(logits)
        lse_sq = torch.logsumexp(logits, dim=-1).square()
        rows = groups(counts).shape[0]
        stats = torch.cat([groups(counts), groups(scores.detach()),
                           torch.stack([lse_sq.detach().sum(),
                                        logits.new_tensor(float(logits.shape[0]))]).expand(rows, 2),
                           load.sum(0, keepdim=True).expand(rows, E)], dim=1)
        stats = _all_reduce(stats.clone(), self.stat_groups)
        tokens_g, probs_g, lse_g, n_g = stats[:, :E], stats[:, E:2 * E], stats[0, 2 * E], stats[0, 2 * E + 1]
        seq_tokens = n_g / stats.shape[0]  # tokens of one sequence (seq_aux) or of the micro-batch
        loss = aux_logged = z_logged = logits.new_zeros(())  # (tensors: no host sync per layer)
        if cfg.moe_router_load_balancing_type in ("aux_loss", "seq_aux_loss") and cfg.moe_aux_loss_coeff:
            c = cfg.moe_aux_loss_coeff * E / (seq_tokens * seq_tokens * self.topk) / stats.shape[0]
            loss = c * (tokens_g * groups(scores)).sum()
            aux_logged = c * (tokens_g * probs_g).sum()
        if cfg.moe_z_loss_coeff:
            loss = loss + cfg.moe_z_loss_coeff * lse_sq.sum() / n_g
            z_logged = cfg.moe_z_loss_coeff * lse_g / n_g
        record = {"layer": self.layer_number, "aux": aux_logged, "z": z_logged,
                  "tokens_per_expert": stats[0, 2 * E + 2:]}
        return loss, record

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: torch.Tensor, rate: float) -> None:
        """After an update: ``bias += rate * sign(mean load - load)``, from the tokens each
        expert got in the global batch (the same numbers on every rank)."""
        self.expert_bias += rate * torch.sign(tokens_per_expert.mean() - tokens_per_expert)
