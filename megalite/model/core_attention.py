"""Core attention: ``softmax(q k^T / sqrt(d)) v`` with a causal mask, one function per backend.

Every implementation has the signature ``fn(q [s, b, n, d], k, v [s, b, g, d], dropout, ctx,
document_mask=None) -> [s, b, n*d]`` (Megatron's ``sbhd`` layout; ``g`` key/value groups, GQA
when ``g < n``), so the attention layer does not care which one runs. ``document_mask`` (a
:class:`~.document_mask.DocumentMask`, with ``--reset-attention-mask``) restricts each query to
its own document: on the CPU SDPA runs on chunks of queries, each against only the keys its
documents can reach (:func:`chunked_document_attention`); on CUDA fp16/bf16 torch's
``varlen_attn`` (no dropout) and, with ``--use-flash-attn``, flash-attn's
``flash_attn_varlen_func`` take its ``cu_seqlens`` (:func:`varlen_attention`); otherwise SDPA
takes its whole additive mask.
:func:`core_attention_fn` picks one for a config; which backends are usable is decided in
:mod:`.backends` (this module depends on it, never the other way round).

* :func:`sdpa_attention`: torch's ``scaled_dot_product_attention``, the reference and fallback.
* :func:`flash_attention`: flash-attn on CUDA fp16/bf16 tensors (``--use-flash-attn``).
* :class:`TransformerEngineAttention`: TE's fused kernel (``--transformer-impl transformer_engine``);
  with a document mask it uses SDPA (TE's packed ``thd`` path is not wired in).

Context parallelism has its own attention (:mod:`.context_parallel`): it needs the keys of
the other CP ranks.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from . import backends


# Queries per SDPA call of chunked_document_attention: measured on 2 CPU cores (s = 512..4096,
# 2..14 documents per sample), 128-256 beat both one call with the whole mask and plain causal.
DOCUMENT_QUERY_CHUNK = 256


def sdpa_attention(q, k, v, dropout: float, ctx, document_mask=None) -> torch.Tensor:
    """Causal attention of ``q [s, b, n, d]``, ``k, v [s, b, g, d]``; returns ``[s, b, n*d]``.
    With a ``document_mask``: within each document (chunked on the CPU; torch's varlen kernel on
    CUDA where it runs, else the whole additive mask)."""
    if document_mask is not None and not q.is_cuda:
        return chunked_document_attention(q, k, v, document_mask, dropout)
    if document_mask is not None and _torch_varlen_usable(q, dropout):
        return varlen_attention(q, k, v, document_mask, dropout, _torch_varlen)
    s, b = q.shape[:2]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    mask = None if document_mask is None else document_mask.additive(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def chunked_document_attention(q, k, v, document_mask, dropout: float, chunk: int | None = None) -> torch.Tensor:
    """Attention within documents by SDPA on ``chunk`` queries at a time, each against only the
    keys from the earliest document start of its queries to its own end, with that block's
    additive mask (:meth:`~.document_mask.DocumentMask.query_chunks`). The blocks left out are
    all masked, so the result is the whole-mask attention's, at a fraction of its work: the
    upper triangle (as ``is_causal``) and most of the lower one are never computed.
    ``chunk`` defaults to :data:`DOCUMENT_QUERY_CHUNK`."""
    chunk = chunk or DOCUMENT_QUERY_CHUNK
    s, b = q.shape[:2]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
    outs = [F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, first:end], v[:, :, first:end],
                                           attn_mask=mask, dropout_p=dropout, enable_gqa=k.shape[1] != q.shape[1])
            for start, end, first, mask in document_mask.query_chunks(chunk, q.dtype)]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
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


# -- variable-length (packed documents) kernels ------------------------------------------------
def varlen_attention(q, k, v, document_mask, dropout: float, kernel) -> torch.Tensor:
    """Causal attention within each document, by a variable-length ``kernel``: the documents of
    all samples are laid end to end (``[b*s, heads, d]``, THD) and delimited by the mask's
    ``cu_seqlens``. ``kernel(q, k, v, cu_seqlens, max_seqlen, dropout) -> [b*s, n, d]``."""
    s, b = q.shape[:2]
    cu_seqlens, max_seqlen = document_mask.varlen()
    q, k, v = (t.transpose(0, 1).reshape(b * s, t.shape[2], t.shape[3]) for t in (q, k, v))
    out = kernel(q, k, v, cu_seqlens, max_seqlen, dropout)
    return out.reshape(b, s, -1).transpose(0, 1).contiguous()


def _flash_varlen(q, k, v, cu_seqlens, max_seqlen: int, dropout: float) -> torch.Tensor:
    varlen = backends.require("flash_attn").flash_attn_varlen_func
    return varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=dropout, causal=True)


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen: int, dropout: float) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn  # CUDA flash kernel of recent torch; no dropout

    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, window_size=(-1, 0),
                       enable_gqa=k.shape[1] != q.shape[1])


def _torch_varlen_usable(q, dropout: float) -> bool:
    """torch's ``varlen_attn`` runs here: CUDA (sm80+) fp16/bf16, no dropout, a torch that has it."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0):
        return False
    if torch.cuda.get_device_capability(q.device)[0] < 8 or not backends.is_installed("torch.nn.attention.varlen"):
        return False
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    return "window_size" in params and "enable_gqa" in params


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
