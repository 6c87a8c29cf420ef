"""A plain-PyTorch GPT / Llama-style decoder: the independent reference of the serial megalite model.

It shares no code with megalite (only torch) and is written the Hugging Face / nanoGPT way:
activations ``[batch, seq, hidden]``, separate q/k/v/o projections, hand-written causal softmax
attention with K/V heads repeated for grouped-query attention (HF ``repeat_kv``), RoPE in HF
Llama's ``rotate_half`` form, hand-written norms and activations, ``F.cross_entropy`` for the loss.
No dropout. tests/test_reference_models.py maps megalite's weights onto it and compares.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ReferenceConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int            # == num_heads: multi-head attention; fewer: GQA
    ffn_hidden_size: int
    max_positions: int
    position_embedding: str = "learned_absolute"  # or "rope"
    rope_theta: float = 10000.0
    norm: str = "LayerNorm"      # or "RMSNorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"     # "gelu" (exact erf), "gelu_tanh" (GPT-2's gelu_new) or "swiglu"
    bias: bool = True            # biases of the linear layers
    tie_word_embeddings: bool = True


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight, self.bias = eps, nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class RMSNorm(nn.Module):  # HF LlamaRMSNorm
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def make_norm(cfg: ReferenceConfig) -> nn.Module:
    return (RMSNorm if cfg.norm == "RMSNorm" else LayerNorm)(cfg.hidden_size, cfg.norm_eps)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float):
    """HF Llama's rotary tables ``[seq, head_dim]``: the frequencies repeated over both halves."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(seq_len).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size // cfg.num_heads
        h, d = cfg.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=cfg.bias)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=cfg.bias)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=cfg.bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=cfg.bias)

    def forward(self, x, rope=None):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)  # [b, heads, s, d]
        k = self.k_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # GQA (HF repeat_kv): query head i uses key/value head i // (heads / kv heads)
        k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.activation = cfg.activation
        h, f = cfg.hidden_size, cfg.ffn_hidden_size
        if cfg.activation == "swiglu":
            self.gate_proj = nn.Linear(h, f, bias=cfg.bias)
        self.up_proj = nn.Linear(h, f, bias=cfg.bias)
        self.down_proj = nn.Linear(f, h, bias=cfg.bias)

    def forward(self, x):
        u = self.up_proj(x)
        if self.activation == "swiglu":
            g = self.gate_proj(x)
            u = g * torch.sigmoid(g) * u  # silu(gate) * up
        elif self.activation == "gelu_tanh":  # nanoGPT's NewGELU
            u = 0.5 * u * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u.pow(3))))
        else:
            u = 0.5 * u * (1.0 + torch.erf(u / math.sqrt(2.0)))
        return self.down_proj(u)


class Block(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.input_layernorm, self.self_attn = make_norm(cfg), Attention(cfg)
        self.post_attention_layernorm, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x, rope=None):
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class ReferenceGPT(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.position_embedding == "learned_absolute":
            self.embed_positions = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # nanoGPT weight tying

    def forward(self, input_ids, labels=None):
        """Logits ``[b, s, vocab]``, or with ``labels`` the per-token loss ``[b, s]``."""
        b, s = input_ids.shape
        x = self.embed_tokens(input_ids)
        rope = None
        if self.cfg.position_embedding == "learned_absolute":
            x = x + self.embed_positions(torch.arange(s, device=input_ids.device))
        else:
            rope = tuple(t.to(x) for t in rope_cos_sin(s, self.cfg.hidden_size // self.cfg.num_heads,
                                                        self.cfg.rope_theta))
        for layer in self.layers:
            x = layer(x, rope)
        logits = self.lm_head(self.norm(x))
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(b, s)
