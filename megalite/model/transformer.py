"""The transformer block, built from tensor-parallel layers.

Activations are ``[sequence, batch, hidden]`` (Megatron's layout). One block is::

    x = x + dropout(attention(norm_1(x)))
    x = x + dropout(mlp(norm_2(x)))

Options: LayerNorm or RMSNorm, learned or rotary positions (RoPE is applied here, learned
ones in the embedding), GELU or SwiGLU MLP, grouped-query attention, biases on or off,
sequence parallelism (norms and dropout on a sequence shard), selective recompute.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, moe_layer_pattern
from ..parallel_state import ParallelState
from ..tensor_parallel import (ColumnParallelLinear, RowParallelLinear, checkpoint,
                               init_method_normal, scaled_init_method_normal)
from ..tensor_parallel.random import RNGStatesTracker
from .activations import mlp_activation
from .backends import norm_class
from .context_parallel import context_parallel_attention
from .core_attention import core_attention_fn
from .moe import MoELayer


def build_norm(cfg: ModelConfig, sequence_parallel: bool) -> nn.Module:
    """LayerNorm or RMSNorm; under SP its params get partial grads (``sequence_parallel``)."""
    norm = norm_class(cfg)(cfg.hidden_size, eps=cfg.norm_epsilon)
    for p in norm.parameters():
        p.sequence_parallel = sequence_parallel
    return norm


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, base: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the given positions (non-interleaved halves, the convention of
    Megatron-Core and Hugging Face Llama): ``[s, 1, 1, head_dim]`` for positions ``[s]`` shared by
    the batch, ``[s, b, 1, head_dim]`` for per-sample positions ``[b, s]`` (``--reset-position-ids``)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    emb = emb[:, None, None, :] if positions.dim() == 1 else emb.transpose(0, 1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [s, b, n, d]`` by the position angles: ``x cos + rotate_half(x) sin``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class ParallelContext:
    """What every layer needs besides its config: groups, the RNG tracker, SP on/off."""

    def __init__(self, pstate: ParallelState, tracker: RNGStatesTracker | None, sequence_parallel: bool = False):
        self.pstate, self.tracker, self.sequence_parallel = pstate, tracker, sequence_parallel
        self.moe = None  # the chunk's MoERecorder (aux-loss scale in, router statistics out) with experts

    def parallel_rng(self):
        """RNG for dropout on sharded activations: per-TP-rank stream when there is one."""
        return self.tracker.fork() if self.tracker is not None else contextlib.nullcontext()


class Attention(nn.Module):
    """Causal self-attention with heads (and key/value groups) split across TP ranks.

    The fused QKV weight is laid out per key/value group ``[q_1..q_k, k, v]`` so that a
    contiguous row slice gives each TP rank whole groups.
    """

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext):
        super().__init__()
        tp = ctx.pstate.tp_size
        self.ctx, self.cfg = ctx, cfg
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.num_heads = cfg.num_attention_heads // tp
        if cfg.num_query_groups % tp or cfg.num_attention_heads % cfg.num_query_groups:
            raise ValueError(f"{cfg.num_query_groups} key/value groups (--num-query-groups) must divide "
                             f"{cfg.num_attention_heads} heads and be divisible by tensor-parallel size {tp}: "
                             "KV heads are split across TP ranks")
        self.num_groups = cfg.num_query_groups // tp
        self.q_per_group = cfg.num_attention_heads // cfg.num_query_groups
        qkv_size = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * self.head_dim
        common = dict(tp_group=ctx.pstate.tp_group, bias=not cfg.disable_bias_linear,
                      sequence_parallel=ctx.sequence_parallel)
        self.qkv = ColumnParallelLinear(cfg.hidden_size, qkv_size, init_method=init_method_normal(cfg.init_method_std),
                                        **common)
        self.proj = RowParallelLinear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size,
                                      init_method=scaled_init_method_normal(cfg.init_method_std, cfg.num_layers),
                                      **common)
        self.selective_recompute = cfg.recompute_granularity == "selective"
        # Context parallelism needs keys from other ranks: it has its own (torch) attention.
        self.core_attention = (context_parallel_attention if ctx.pstate.cp_size > 1
                               else core_attention_fn(cfg))

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                document_mask=None) -> torch.Tensor:
        """``x [s, b, h]`` (a sequence shard under SP) -> attention output ``[s, b, h]``; a
        :class:`~.document_mask.DocumentMask` keeps each query within its document."""
        qkv = self.qkv(x)
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.num_groups, self.q_per_group + 2, self.head_dim)
        # split, not indexing: its backward is one cat, not a zero-filled qkv-sized grad per piece
        q, k, v = qkv.split([self.q_per_group, 1, 1], dim=3)
        q, k, v = q.reshape(s, b, self.num_heads, self.head_dim), k.squeeze(3), v.squeeze(3)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        dropout = self.cfg.attention_dropout if self.training else 0.0
        if self.selective_recompute:
            context = checkpoint(self._core, self.ctx.tracker, q, k, v, dropout, document_mask)
        else:
            context = self._core(q, k, v, dropout, document_mask)
        return self.proj(context)

    def _core(self, q, k, v, dropout: float, document_mask=None) -> torch.Tensor:
        with self.ctx.parallel_rng() if dropout > 0 else contextlib.nullcontext():
            return self.core_attention(q, k, v, dropout, self.ctx, document_mask)


class MLP(nn.Module):
    """``fc2(act(fc1(x)))`` with fc1 column-parallel and fc2 row-parallel (GELU or SwiGLU)."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, ffn_hidden_size: int | None = None):
        super().__init__()
        ffn = ffn_hidden_size or cfg.ffn_hidden_size
        self.swiglu = cfg.swiglu
        self.gelu_approximate = "tanh" if cfg.openai_gelu else "none"  # --openai-gelu: GPT-2's gelu_new
        parts = 2 if cfg.swiglu else 1
        common = dict(tp_group=ctx.pstate.tp_group, bias=not cfg.disable_bias_linear,
                      sequence_parallel=ctx.sequence_parallel)
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, parts * ffn, parts=parts,
                                        init_method=init_method_normal(cfg.init_method_std), **common)
        self.fc2 = RowParallelLinear(ffn, cfg.hidden_size,
                                     init_method=scaled_init_method_normal(cfg.init_method_std, cfg.num_layers),
                                     **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [s, b, h]`` -> ``[s, b, h]``; the intermediate activation is split over TP."""
        return self.fc2(mlp_activation(self.fc1(x), self.swiglu, self.gelu_approximate))


class TransformerLayer(nn.Module):
    """Pre-norm block: attention and MLP, each added to the residual stream after dropout.
    The MLP of layer ``layer_number`` (0-based, in the whole model) is a :class:`MoELayer`
    when ``--num-experts`` is set and ``--moe-layer-freq`` marks it."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, layer_number: int = 0):
        super().__init__()
        self.ctx, self.hidden_dropout = ctx, cfg.hidden_dropout
        self.norm_1 = build_norm(cfg, ctx.sequence_parallel)
        self.attention = Attention(cfg, ctx)
        self.norm_2 = build_norm(cfg, ctx.sequence_parallel)
        if cfg.num_experts and moe_layer_pattern(cfg.moe_layer_freq, cfg.num_layers)[layer_number]:
            shared = cfg.moe_shared_expert_intermediate_size
            self.mlp = MoELayer(cfg, ctx, layer_number, MLP(cfg, ctx, shared) if shared else None)
        else:
            self.mlp = MLP(cfg, ctx)

    def forward(self, x: torch.Tensor, rotary=None, document_mask=None) -> torch.Tensor:
        """One block on ``x [s, b, h]``; ``rotary`` is the (cos, sin) pair with RoPE, else None;
        ``document_mask`` the packed documents' attention mask, else None (plain causal)."""
        x = x + self._dropout(self.attention(self.norm_1(x), rotary, document_mask))
        return x + self._dropout(self.mlp(self.norm_2(x)))

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.hidden_dropout == 0.0:
            return x
        # Under SP each rank holds a different slice: masks must differ, so use the TP stream.
        with self.ctx.parallel_rng() if self.ctx.sequence_parallel else contextlib.nullcontext():
            return F.dropout(x, self.hidden_dropout, training=True)
