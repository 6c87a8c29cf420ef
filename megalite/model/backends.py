"""Optional fused backends, chosen by flag (and, for apex, by auto-detection), imported lazily.

=====================  ==================================  =======================  =====================
backend                chosen by                           replaces                 pip package
=====================  ==================================  =======================  =====================
FlashAttention         ``--use-flash-attn``                core attention (SDPA)    ``flash-attn``
Transformer Engine     ``--transformer-impl                norms, core attention    ``transformer-engine``
                       transformer_engine``
apex                   auto: installed and CUDA present    LayerNorm/RMSNorm, AdamW ``apex``
=====================  ==================================  =======================  =====================

Nothing here imports an optional package at module import time. A backend asked for by flag
but not installed is reported by :func:`missing_backends` (config validation: one line naming
the flag and the pip package) or :func:`require` (raises :class:`BackendUnavailable`).
The torch implementations are the reference and the fallback: FlashAttention only runs on
CUDA fp16/bf16 tensors and falls back to SDPA otherwise.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

import torch

# module -> (flag that asks for it, package, how to install it)
PACKAGES = {
    "flash_attn": ("--use-flash-attn", "flash-attn", "pip install flash-attn"),
    "transformer_engine": ("--transformer-impl transformer_engine", "transformer-engine",
                           "pip install transformer-engine[pytorch]"),
    "apex": ("apex fused kernels (auto-detected)", "NVIDIA apex",
             "build github.com/NVIDIA/apex with --cpp_ext --cuda_ext (PyPI's 'apex' is another project)"),
}
# Compiled extensions whose presence makes apex's fused norms / Adam usable.
APEX_NORM_EXT, APEX_ADAM_EXT = "fused_layer_norm_cuda", "amp_C"


class BackendUnavailable(RuntimeError):
    """An optional backend was requested but cannot be used (not installed, or no CUDA)."""


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _message(module: str) -> str:
    flag, package, install = PACKAGES[module.split(".")[0]]
    return f"{flag} needs the {package} package, which is not installed: {install} (or drop {flag})"


def require(module: str):
    """Import optional ``module`` or raise :class:`BackendUnavailable` naming flag and package."""
    if not is_installed(module):
        raise BackendUnavailable(_message(module))
    try:
        return importlib.import_module(module)
    except ImportError as e:  # installed but broken (e.g. built against another torch)
        raise BackendUnavailable(f"{_message(module).split(',')[0]} but importing it failed: {e}") from None


def missing_backends(cfg) -> list[str]:
    """Config-validation errors for backends asked for by flag but not installed (or no CUDA)."""
    wanted = ["flash_attn"] if cfg.use_flash_attn else []
    if cfg.transformer_impl == "transformer_engine":
        wanted.append("transformer_engine")
    return [_message(m) if not is_installed(m) else _no_cuda_message(m)
            for m in wanted if not is_installed(m) or not torch.cuda.is_available()]


def _no_cuda_message(module: str) -> str:
    flag = PACKAGES[module][0]
    return f"{flag} needs a CUDA device; this run is on CPU (drop {flag})"


@dataclass(frozen=True)
class Backends:
    attention: str  # torch | flash | transformer_engine
    norm: str       # torch | apex | transformer_engine
    adam: str       # torch | apex


def _cuda(device: torch.device | None) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return device.type == "cuda"


def resolve(cfg, device: torch.device | None = None) -> Backends:
    """The implementation of each component for ``cfg`` on ``device`` (None: CUDA if present).

    Raises :class:`BackendUnavailable` when a flag asks for a backend that is missing or needs
    CUDA on a CPU-only run. apex is used only on CUDA and when built with its CUDA extensions.
    """
    cuda = _cuda(device)
    te = cfg.transformer_impl == "transformer_engine"
    for module, wanted in (("flash_attn", cfg.use_flash_attn), ("transformer_engine", te)):
        if wanted and not is_installed(module):
            raise BackendUnavailable(_message(module))
        if wanted and not cuda:
            raise BackendUnavailable(_no_cuda_message(module))
    apex_norm = cuda and is_installed("apex") and is_installed(APEX_NORM_EXT)
    attention = "flash" if cfg.use_flash_attn else "transformer_engine" if te else "torch"
    norm = "transformer_engine" if te else "apex" if apex_norm else "torch"
    return Backends(attention, norm, "apex" if _apex_adam(device) else "torch")


def _apex_adam(device) -> bool:
    return _cuda(device) and is_installed("apex") and is_installed(APEX_ADAM_EXT)


# -- norms -------------------------------------------------------------------------------
def norm_class(cfg, device: torch.device | None = None):
    """A ``cls(hidden_size, eps=...)`` for ``cfg.normalization`` on the resolved backend."""
    rms = cfg.normalization == "RMSNorm"
    kind = resolve(cfg, device).norm
    if kind == "transformer_engine":
        te = require("transformer_engine.pytorch")
        return te.RMSNorm if rms else te.LayerNorm
    if kind == "apex":
        normalization = require("apex.normalization")
        return normalization.FusedRMSNorm if rms else normalization.FusedLayerNorm
    return torch.nn.RMSNorm if rms else torch.nn.LayerNorm


# -- optimizer ---------------------------------------------------------------------------
def adam_class(device: torch.device | None = None):
    """apex's FusedAdam (decoupled weight decay, as AdamW) on CUDA when installed, else AdamW."""
    if _apex_adam(device):
        from functools import partial
        return partial(require("apex.optimizers").FusedAdam, adam_w_mode=True)
    return torch.optim.AdamW


# -- core attention ----------------------------------------------------------------------
def core_attention_fn(cfg, device: torch.device | None = None):
    """``fn(q [s,b,n,d], k, v [s,b,g,d], dropout, ctx) -> [s, b, n*d]`` for the resolved backend."""
    from .transformer import sdpa_attention
    kind = resolve(cfg, device).attention
    if kind == "flash":
        return flash_attention
    if kind == "transformer_engine":
        return TransformerEngineAttention(cfg)
    return sdpa_attention


def flash_attention(q, k, v, dropout: float, ctx) -> torch.Tensor:
    """FlashAttention (causal) on CUDA fp16/bf16 tensors; SDPA for anything else."""
    from .transformer import sdpa_attention
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return sdpa_attention(q, k, v, dropout, ctx)
    flash_attn_func = require("flash_attn").flash_attn_func
    s, b = q.shape[:2]
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [b, s, heads, d]; GQA handled natively
    out = flash_attn_func(q, k, v, dropout_p=dropout, causal=True)
    return out.transpose(0, 1).reshape(s, b, -1)


class TransformerEngineAttention:
    """Transformer Engine's fused DotProductAttention in Megatron's ``sbhd`` layout."""

    def __init__(self, cfg):
        self.cfg, self.modules = cfg, {}

    def __call__(self, q, k, v, dropout: float, ctx) -> torch.Tensor:
        key = (q.shape[2], k.shape[2], dropout)
        if key not in self.modules:
            te = require("transformer_engine.pytorch")
            self.modules[key] = te.DotProductAttention(
                q.shape[2], q.shape[3], num_gqa_groups=k.shape[2], attention_dropout=dropout,
                qkv_format="sbhd", attn_mask_type="causal")
        s, b = q.shape[:2]
        return self.modules[key](q, k, v).reshape(s, b, -1)

