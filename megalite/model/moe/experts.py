"""The experts of one MoE layer held by this rank: its EP share, each sharded over ETP.

Expert ``e`` (global index) lives on expert-parallel rank ``e // (E / EP)``. Its MLP is split
like a dense one over the expert-tensor-parallel group: ``fc1`` by output rows (SwiGLU: gate
and up blocks separately), ``fc2`` by input columns, so a rank's output is a partial sum over
ETP that the dispatcher's reduction completes. Every expert's full weights are drawn from a
seed of its own (the layer's seed plus its global index), so any EP / ETP layout starts from
the serial model's weights. Experts have no biases (as Mixtral, Qwen-MoE, OLMoE, DeepSeek).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...tensor_parallel import init_method_normal, scaled_init_method_normal
from ...tensor_parallel.layers import _sharded_parameter
from ..activations import mlp_activation


class ExpertLinear(nn.Module):
    """A bias-free linear holding this rank's ETP shard of one expert's weight (no reduction)."""

    def __init__(self, weight: nn.Parameter, etp: tuple[int, int]):
        super().__init__()
        self.weight = weight
        weight.expert = True     # reduced over the expert-data-parallel group, not DP x CP
        weight.expert_tp = etp   # (rank, size) of its TP split: the ETP group's, not the dense TP's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class ExpertMLP(nn.Module):
    """One expert's ``fc2(act(fc1(x)))`` on this rank's ETP shard: a partial sum over ETP."""

    def __init__(self, cfg, ffn: int, etp_group, etp: tuple[int, int]):
        super().__init__()
        self.swiglu = cfg.swiglu
        self.gelu_approximate = "tanh" if cfg.openai_gelu else "none"
        parts = 2 if cfg.swiglu else 1
        self.fc1 = ExpertLinear(_sharded_parameter((parts * ffn, cfg.hidden_size), 0, etp_group,
                                                   init_method_normal(cfg.init_method_std), torch.float32, None,
                                                   parts=parts), etp)
        self.fc2 = ExpertLinear(_sharded_parameter((cfg.hidden_size, ffn), 1, etp_group,
                                                   scaled_init_method_normal(cfg.init_method_std, cfg.num_layers),
                                                   torch.float32, None), etp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(mlp_activation(self.fc1(x), self.swiglu, self.gelu_approximate))


class LocalExperts(nn.ModuleList):
    """The ``E / EP`` experts of expert-parallel rank ``ep_rank`` (module ``j`` is global
    expert ``first + j``)."""

    def __init__(self, cfg, pstate, base_seed: int):
        num_local = cfg.num_experts // pstate.ep_size
        first = pstate.ep_rank * num_local
        ffn = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
        experts = []
        for j in range(num_local):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(base_seed + first + j)
                experts.append(ExpertMLP(cfg, ffn, pstate.etp_group, (pstate.etp_rank, pstate.etp_size)))
        super().__init__(experts)
        self.num_local, self.first, self.grouped_gemm = num_local, first, cfg.moe_grouped_gemm

    def forward(self, x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        """``out [len(x), h]``: for each assignment ``a`` (all for experts this rank holds),
        ``out[token[a]] += weight[a] * expert[a](x[token[a]])`` (no weight: 1). Each expert
        gathers its own rows of ``x`` and adds its output in place: one gather and one scatter
        per assignment. A loop over the local experts, or with ``--moe-grouped-gemm`` on CUDA
        one grouped GEMM per projection."""
        out = x.new_zeros(x.shape)
        if self.grouped_gemm and grouped_mm_available(x):
            order = torch.argsort(expert, stable=True)
            y = self._grouped(x.index_select(0, token.index_select(0, order)), expert.index_select(0, order))
            if weight is not None:
                y = y * weight.index_select(0, order).unsqueeze(1).to(y.dtype)
            return out.index_add_(0, token.index_select(0, order), y)
        for j, mlp in enumerate(self):
            mine = (expert == self.first + j).nonzero(as_tuple=True)[0]
            if mine.numel():
                rows = token.index_select(0, mine)
                y = mlp(x.index_select(0, rows))
                if weight is not None:
                    y = y * weight.index_select(0, mine).unsqueeze(1).to(y.dtype)
                out.index_add_(0, rows, y)  # (in place: index_add's backward does not need out)
        return out

    def _grouped(self, rows: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
        """All local experts in two ``torch._grouped_mm`` calls on ``rows`` sorted by expert.
        Not yet run on a GPU."""
        counts = torch.bincount(expert_of_row - self.first, minlength=self.num_local)
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        fc1 = torch.stack([e.fc1.weight for e in self]).transpose(1, 2)  # [E_local, h, ffn(x2)]
        fc2 = torch.stack([e.fc2.weight for e in self]).transpose(1, 2)  # [E_local, ffn, h]
        h = mlp_activation(torch._grouped_mm(rows, fc1, offs=offsets), self[0].swiglu, self[0].gelu_approximate)
        return torch._grouped_mm(h, fc2, offs=offsets)


def grouped_mm_available(x: torch.Tensor) -> bool:
    """``torch._grouped_mm`` runs on CUDA bf16 tensors (Hopper and newer); elsewhere the loop."""
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
