"""The MLP activation shared by the dense MLP and the MoE experts."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mlp_activation(h: torch.Tensor, swiglu: bool, gelu_approximate: str = "none") -> torch.Tensor:
    """SwiGLU on ``h = [gate, up]`` (halves of the last dim) -> ``silu(gate) * up``; else GELU
    (``gelu_approximate="tanh"``: GPT-2's gelu_new, ``--openai-gelu``)."""
    if swiglu:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate=gelu_approximate)
