"""Core attention: ``softmax(q k^T / sqrt(d)) v`` with a causal mask, one function per backend.

Every implementation has the signature ``fn(q [s, b, n, d], k, v [s, b, g, d], dropout, ctx,
document_mask=None) -> [s, b, n*d]`` (Megatron's ``sbhd`` layout; ``g`` key/value groups, GQA
when ``g < n``), so the attention layer does not care which one runs. ``document_mask`` (a
:class:`~.document_mask.DocumentMask`, with ``--reset-attention-mask``) restricts each query to
its own document: :func:`.document_attention.document_attention` picks the kernel (chunked SDPA
on the CPU; on CUDA torch's ``varlen_attn``, FlexAttention, chunked SDPA with dropout, the whole
mask only as the last fallback), except that with ``--use-flash-attn`` flash-attn's
``flash_attn_varlen_func`` takes its ``cu_seqlens`` on CUDA fp16/bf16.
:func:`core_attention_fn` picks one for a config; which backends are usable is decided in
:mod:`.backends` (this module depends on it, never the other way round).

* :func:`sdpa_attention`: torch's ``scaled_dot_product_attention``, the reference and fallback.
* :func:`flash_attention`: flash-attn on CUDA fp16/bf16 tensors (``--use-flash-attn``).
* :class:`TransformerEngineAttention`: TE's fused kernel (``--transformer-impl transformer_engine``);
  with a document mask it uses SDPA (TE's packed ``thd`` path is not wired in).

Context parallelism has its own attention (:mod:`.context_parallel`): it needs the keys of
the other CP ranks (:func:`.document_attention.document_attention` also takes its document
masks, whose keys are the gathered sequence).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends
from .document_attention import document_attention, varlen_attention


def sdpa_attention(q, k, v, dropout: float, ctx, document_mask=None) -> torch.Tensor:
    """Causal attention of ``q [s, b, n, d]``, ``k, v [s, b, g, d]``; returns ``[s, b, n*d]``.
    With a ``document_mask``: within each document, by the kernel
    :func:`.document_attention.document_attention` picks for this call."""
    if document_mask is not None:
        return document_attention(q, k, v, document_mask, dropout)
    s, b = q.shape[:2]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def flash_attention(q, k, v, dropout: float, ctx, document_mask=None) -> torch.Tensor:
    """FlashAttention (causal; varlen with a document mask) on CUDA fp16/bf16 tensors; SDPA for
    anything else."""
    # flash-attn has kernels for half precision on CUDA only; the fallback keeps one code path.
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return sdpa_attention(q, k, v, dropout, ctx, document_mask)
    if document_mask is not None:
        return varlen_attention(q, k, v, document_mask, dropout, _flash_varlen)
    flash_attn_func = backends.require("flash_attn").flash_attn_func
    s, b = q.shape[:2]
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [b, s, heads, d]; GQA handled natively
    out = flash_attn_func(q, k, v, dropout_p=dropout, causal=True)
    return out.transpose(0, 1).reshape(s, b, -1)


def _flash_varlen(q, k, v, cu_seqlens, max_seqlen: int, dropout: float) -> torch.Tensor:
    varlen = backends.require("flash_attn").flash_attn_varlen_func
    return varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=dropout, causal=True)


class TransformerEngineAttention:
    """Transformer Engine's fused DotProductAttention in Megatron's ``sbhd`` layout."""

    def __init__(self, cfg):
        # TE's module is built for fixed head counts and dropout: one per combination seen.
        self.cfg, self.modules = cfg, {}

    def __call__(self, q, k, v, dropout: float, ctx, document_mask=None) -> torch.Tensor:
        if document_mask is not None:
            return sdpa_attention(q, k, v, dropout, ctx, document_mask)
        key = (q.shape[2], k.shape[2], dropout)
        if key not in self.modules:
            te = backends.require("transformer_engine.pytorch")
            self.modules[key] = te.DotProductAttention(
                q.shape[2], q.shape[3], num_gqa_groups=k.shape[2], attention_dropout=dropout,
                qkv_format="sbhd", attn_mask_type="causal")
        s, b = q.shape[:2]
        return self.modules[key](q, k, v).reshape(s, b, -1)


def core_attention_fn(cfg, device: torch.device | None = None):
    """The core attention for ``cfg`` on ``device`` (None: CUDA if present), as resolved by
    :func:`.backends.resolve` (which raises if a flag asks for a missing backend)."""
    kind = backends.resolve(cfg, device).attention
    if kind == "flash":
        return flash_attention
    if kind == "transformer_engine":
        return TransformerEngineAttention(cfg)
    return sdpa_attention
