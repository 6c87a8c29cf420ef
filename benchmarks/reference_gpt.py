"""A plain PyTorch GPT, written for ``benchmarks/step_time.py`` to compare megalite against.

nanoGPT style: ``[batch, sequence, hidden]`` activations, pre-LayerNorm blocks, a fused QKV
``nn.Linear``, ``F.scaled_dot_product_attention(is_causal=True)``, a GELU MLP, learned
positions, tied input/output embeddings and ``F.cross_entropy``. It is the same architecture
and initialisation as megalite's default GPT (N(0, std) weights, N(0, std / sqrt(2 L)) for the
two output projections, zero biases, unit LayerNorm weights), and :func:`reference_optimizer`
is the same AdamW (no weight decay on biases and 1-D params). What it lacks on purpose: every
parallel feature, grad buffers, fp32 main weights and the pipeline schedules, i.e. everything
megalite's hot path could lose time on at TP = PP = DP = 1.

:func:`copy_from_megalite` loads a megalite model's weights (the fused QKV rows are reordered:
megalite lays them out per head ``[q_i, k_i, v_i]``, nanoGPT as ``[q, k, v]``), so the two
produce the same losses step after step.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, std: float, num_layers: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(hidden, eps=1e-5)
        self.c_attn = nn.Linear(hidden, 3 * hidden)
        self.c_proj = nn.Linear(hidden, hidden)
        self.ln_2 = nn.LayerNorm(hidden, eps=1e-5)
        self.c_fc = nn.Linear(hidden, ffn)
        self.mlp_proj = nn.Linear(ffn, hidden)
        for linear, scaled in ((self.c_attn, False), (self.c_proj, True), (self.c_fc, False), (self.mlp_proj, True)):
            nn.init.normal_(linear.weight, 0.0, std / math.sqrt(2.0 * num_layers) if scaled else std)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.c_attn(x).split(h, dim=2)
        q, k, v = (t.view(b, s, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, s, h))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_proj(F.gelu(self.c_fc(x)))


class ReferenceGPT(nn.Module):
    """GPT with tied embeddings; ``forward(tokens, labels)`` returns the mean token loss."""

    def __init__(self, vocab_size: int, seq_length: int, hidden: int, heads: int, num_layers: int,
                 ffn: int | None = None, std: float = 0.02):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, hidden)
        self.wpe = nn.Embedding(seq_length, hidden)
        nn.init.normal_(self.wte.weight, 0.0, std)
        nn.init.normal_(self.wpe.weight, 0.0, std)
        self.blocks = nn.ModuleList(Block(hidden, heads, ffn or 4 * hidden, std, num_layers)
                                    for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(hidden, eps=1e-5)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied output layer
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))


def reference_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                        eps: float = 1e-8, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and LayerNorm weights).

    ``fused=None`` is torch's default implementation (a per-tensor loop on CPU; nanoGPT fuses on
    CUDA only); ``fused=True`` is the single-kernel one megalite uses."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps,
                             fused=fused)


def train_step(model: ReferenceGPT, optimizer: torch.optim.Optimizer, microbatches: list[dict],
               clip_grad: float = 1.0) -> tuple[float, float]:
    """One iteration with gradient accumulation: returns (mean loss, grad norm before clipping).

    Every micro-batch has the same number of tokens, so the mean over the global batch is the
    mean of the micro-batch means."""
    total = torch.zeros(())
    for mb in microbatches:
        loss = model(mb["tokens"], mb["labels"]) / len(microbatches)
        loss.backward()
        total += loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total.item(), norm.item()


@torch.no_grad()
def copy_from_megalite(ref: ReferenceGPT, chunk) -> None:
    """Load the weights of a single-stage, TP = 1 megalite ``GPTModel`` (default GPT options)."""
    vocab = ref.wte.weight.shape[0]
    ref.wte.weight.copy_(chunk.word_embeddings.weight[:vocab])  # megalite's rows beyond vocab are padding
    ref.wpe.weight.copy_(chunk.position_embeddings.weight[:ref.wpe.weight.shape[0]])
    heads = ref.blocks[0].heads
    for block, layer in zip(ref.blocks, chunk.layers):
        h = block.ln_1.weight.shape[0]
        qkv_w, qkv_b = layer.attention.qkv.weight, layer.attention.qkv.bias
        # megalite: rows [q_0, k_0, v_0, q_1, k_1, v_1, ...] (per head); nanoGPT: [q, k, v].
        block.c_attn.weight.copy_(qkv_w.view(heads, 3, h // heads, h).transpose(0, 1).reshape(3 * h, h))
        block.c_attn.bias.copy_(qkv_b.view(heads, 3, h // heads).transpose(0, 1).reshape(3 * h))
        pairs = ((block.ln_1, layer.norm_1), (block.ln_2, layer.norm_2), (block.c_proj, layer.attention.proj),
                 (block.c_fc, layer.mlp.fc1), (block.mlp_proj, layer.mlp.fc2))
        for mine, theirs in pairs:
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
    ref.ln_f.weight.copy_(chunk.final_norm.weight)
    ref.ln_f.bias.copy_(chunk.final_norm.bias)
