"""Optional fused backends: which ones are installed, usable and chosen; imported lazily.

=====================  ==================================  =======================  =====================
backend                chosen by                           replaces                 pip package
=====================  ==================================  =======================  =====================
FlashAttention         ``--use-flash-attn``                core attention (SDPA)    ``flash-attn``
Transformer Engine     ``--transformer-impl                norms, core attention    ``transformer-engine``
                       transformer_engine``
apex                   auto: installed and CUDA present    LayerNorm/RMSNorm        ``apex``
=====================  ==================================  =======================  =====================

Nothing here imports an optional package at module import time. A backend asked for by flag
but not installed is reported by :func:`missing_backends` (config validation: one line naming
the flag and the pip package) or :func:`require` (raises :class:`BackendUnavailable`).
The torch implementations are the reference and the fallback: FlashAttention only runs on
CUDA fp16/bf16 tensors and falls back to SDPA otherwise.

This module decides *which* implementation each component uses (:func:`resolve`) and builds
the norms (:func:`norm_class`); the attention implementations live in :mod:`.core_attention`,
which imports this module (never the reverse). The optimizer is always torch's AdamW.
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
# Compiled extension whose presence makes apex's fused norms usable (a python-only build lacks it).
APEX_NORM_EXT = "fused_layer_norm_cuda"


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


def missing_backends(cfg, device: torch.device | None = None) -> list[str]:
    """Config-validation errors for backends asked for by flag but not installed (or no CUDA:
    ``device`` not CUDA; None: CUDA if present)."""
    wanted = ["flash_attn"] if cfg.use_flash_attn else []
    if cfg.transformer_impl == "transformer_engine":
        wanted.append("transformer_engine")
    return [_message(m) if not is_installed(m) else _no_cuda_message(m)
            for m in wanted if not is_installed(m) or not _cuda(device)]


def _no_cuda_message(module: str) -> str:
    flag = PACKAGES[module][0]
    return f"{flag} needs a CUDA device; this run is on CPU (drop {flag})"


@dataclass(frozen=True)
class Backends:
    """The implementation chosen for each swappable component."""

    attention: str  # torch | flash | transformer_engine
    norm: str       # torch | apex | transformer_engine


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
    return Backends(attention, norm)


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
