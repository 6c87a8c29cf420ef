"""Use megalite's tensor-parallel layers in your own model.

A tiny next-token model (vocab-parallel embedding -> column/row-parallel MLP -> vocab-parallel
logits and loss) trained with plain torch.optim; the loss is identical at any TP size.

    torchrun --nproc_per_node 2 examples/custom_model.py        # TP=2
    python examples/custom_model.py                             # single process
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalite.parallel_state import ParallelState
from megalite.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                      pad_vocab_size, parallel_lm_logits, vocab_parallel_cross_entropy)


class TinyTPLanguageModel(nn.Module):
    """Embedding, one tensor-parallel MLP block, tied output layer; every weight sharded over TP."""

    def __init__(self, vocab_size: int, hidden: int, pstate: ParallelState):
        super().__init__()
        group = pstate.tp_group
        self.vocab_size, self.group = vocab_size, group
        # Same seed on every rank: each keeps its slice of the same full weights.
        self.embed = VocabParallelEmbedding(vocab_size, hidden, tp_group=group,
                                            padded_vocab_size=pad_vocab_size(vocab_size, 8, pstate.tp_size))
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = ColumnParallelLinear(hidden, 4 * hidden, tp_group=group)   # output split over TP
        self.fc2 = RowParallelLinear(4 * hidden, hidden, tp_group=group)      # input split, all-reduced

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        logits = parallel_lm_logits(x, self.embed.weight, self.group)         # [b, s, vocab / tp]
        return vocab_parallel_cross_entropy(logits, labels, self.group, self.vocab_size).mean()


def train(steps: int = 30, seed: int = 0) -> tuple[TinyTPLanguageModel, list[float]]:
    """Train on a learnable synthetic sequence task; return the model and the loss of every step."""
    pstate = ParallelState.from_sizes(tp=dist.get_world_size() if dist.is_initialized() else 1)
    torch.manual_seed(seed)
    model = TinyTPLanguageModel(vocab_size=50, hidden=32, pstate=pstate)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        start = torch.randint(0, 50, (8, 1), generator=g)
        seq = (start + 3 * torch.arange(17)) % 50                            # learnable: stride 3
        loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def main():
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    _, losses = train()
    if not dist.is_initialized() or dist.get_rank() == 0:
        for step in range(0, len(losses), 10):
            print(f"step {step + 1:3d} | loss {losses[step]:.6f}")
        print(f"final loss {losses[-1]:.6f}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
