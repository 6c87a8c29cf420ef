"""Document-masked attention (``--reset-attention-mask``): which kernel runs, why, and the kernels.

A packed sample lets each query attend only to earlier keys of its own document (a
block-diagonal causal mask, :class:`~.document_mask.DocumentMask`). :func:`document_attention`
picks a kernel per call, by :func:`document_attention_kernel` (a pure function of the device,
dtype, dropout, context parallelism and the installed torch; the start-up line of
:func:`startup_line` is written by the same function):

========  ===================================================  ==========================================
kernel    runs when                                            how it skips the masked blocks
========  ===================================================  ==========================================
chunked   CPU without CP; CUDA with dropout > 0, without CP    SDPA on chunks of queries, each against
                                                               the keys its documents reach
varlen    CUDA sm80+, fp16/bf16, no dropout, no CP, torch      flash kernel on the documents'
          with ``varlen_attn`` (2.10+)                         ``cu_seqlens``
flex      CUDA, no dropout, where varlen cannot run (fp32,     FlexAttention with a block mask built
          sm < 80, torch 2.9, keys gathered from CP ranks)     from the document ids (and positions)
dense     the rest: CP with dropout, CP on the CPU, no flex    none: SDPA with the whole
                                                               ``[b, 1, s_q, s_k]`` additive mask
========  ===================================================  ==========================================

Why dropout never takes varlen or flex: ``varlen_attn`` hard-codes ``dropout_p=0.0`` in every
release, and ``flex_attention`` has no dropout argument in 2.9-2.14 (nor can a ``score_mod``
express it: dropout scales probabilities after the softmax). The chunked path takes dropout
and still never builds the whole mask, so it serves CUDA too (not under CP: its chunks take
whole sequences).

``torch.nn.attention.varlen.varlen_attn`` by release (read from the release wheels; the tests
fake each one)::

    2.9       no torch.nn.attention.varlen
    2.10      (query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None)
    2.11      (..., max_k, *, return_aux=None, scale=None, window_size=(-1, -1))
    2.12-2.14 (..., max_k, *, return_aux=None, scale=None, window_size=(-1, -1), enable_gqa=False,
               seqused_k=None, block_table=None, num_splits=None)

Causal is ``is_causal=True`` on 2.10 and ``window_size=(-1, 0)`` (a tuple: torch compares it
with ``== (-1, 0)``) from 2.11; GQA is ``enable_gqa=True`` from 2.12, before that the key/value
heads are expanded (query head ``h`` uses group ``h // (n / g)``, as SDPA's ``enable_gqa``).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import backends

# Queries per SDPA call of chunked_document_attention: measured on 2 CPU cores (s = 512..4096,
# 2..14 documents per sample), 128-256 beat both one call with the whole mask and plain causal.
DOCUMENT_QUERY_CHUNK = 256
# FlexAttention's tile (its default): the block mask says, per 128 x 128 block, none/some/all.
FLEX_BLOCK_SIZE = 128


@dataclass(frozen=True)
class VarlenSignature:
    """How the installed ``varlen_attn`` is told causal and GQA."""

    causal: str  # "is_causal" (2.10) or "window_size" (2.11+)
    gqa: bool    # has ``enable_gqa`` (2.12+); else the key/value heads are expanded


def installed_varlen_attn():
    """torch's ``varlen_attn`` (2.10+), or None."""
    if not backends.is_installed("torch.nn.attention.varlen"):
        return None
    from torch.nn.attention import varlen

    return getattr(varlen, "varlen_attn", None)


@functools.lru_cache(maxsize=8)  # a pure function of the function object; inspect is slow per call
def varlen_signature(fn) -> VarlenSignature | None:
    """The :class:`VarlenSignature` of a ``varlen_attn`` function (None: None, or no causal argument)."""
    if fn is None:
        return None
    params = inspect.signature(fn).parameters
    causal = "window_size" if "window_size" in params else "is_causal" if "is_causal" in params else None
    return None if causal is None else VarlenSignature(causal, "enable_gqa" in params)


@functools.lru_cache(maxsize=8)  # what is installed does not change; find_spec scans sys.path
def flex_usable(device: torch.device) -> bool:
    """FlexAttention with hand-built block masks exists here (on CUDA it also needs triton)."""
    if not backends.is_installed("torch.nn.attention.flex_attention"):
        return False
    from torch.nn.attention import flex_attention

    ok = hasattr(flex_attention, "flex_attention") and hasattr(flex_attention.BlockMask, "from_kv_blocks")
    return ok and (device.type != "cuda" or backends.is_installed("triton"))


def document_attention_kernel(device: torch.device, dtype: torch.dtype, dropout: float, under_cp: bool,
                              varlen: VarlenSignature | None, flex: bool,
                              capability: tuple[int, int] | None = None) -> tuple[str, str]:
    """``(kernel, reason)``: the kernel of the table above (chunked | varlen | flex | dense) for
    a call on ``device`` in ``dtype`` with ``dropout``, queries against keys gathered from the
    CP ranks (``under_cp``), the installed ``varlen`` signature (None: no ``varlen_attn``),
    ``flex`` usable, and the CUDA ``capability``; ``reason`` says why, in words."""
    if device.type != "cuda":
        if under_cp:
            return "dense", ("CPU under context parallelism (the chunked path takes whole sequences; "
                             "FlexAttention has no backward on the CPU)")
        return "chunked", "this is the CPU (torch's varlen and compiled flex kernels are CUDA's)"
    blockers = []  # why varlen_attn cannot run
    if dropout > 0:
        blockers.append(f"attention dropout {dropout} (varlen_attn has none)")
    if under_cp:
        blockers.append("keys are gathered from the context-parallel ranks")
    if dtype not in (torch.float16, torch.bfloat16):
        blockers.append(f"{str(dtype).replace('torch.', '')} (its flash kernel takes fp16/bf16)")
    if capability is not None and tuple(capability) < (8, 0):
        blockers.append(f"sm{capability[0]}{capability[1]} (its flash kernel needs sm80+)")
    if varlen is None:
        blockers.append(f"torch {torch.__version__.split('+')[0]} has no varlen_attn")
    if not blockers:
        return "varlen", "CUDA fp16/bf16 without dropout or context parallelism"
    if dropout == 0 and flex:
        return "flex", "varlen_attn cannot run: " + "; ".join(blockers)
    if not flex and dropout == 0:
        return "dense", "varlen_attn cannot run (" + "; ".join(blockers) + ") and FlexAttention is unavailable"
    if not under_cp:
        return "chunked", f"attention dropout {dropout}: neither varlen_attn nor FlexAttention takes dropout"
    return "dense", (f"attention dropout {dropout} under context parallelism: varlen_attn and FlexAttention "
                     "take no dropout, the chunked path takes whole sequences")


def describe(kernel: str, varlen: VarlenSignature | None) -> str:
    """The kernel in words, with the varlen arguments of this torch."""
    if kernel == "varlen":
        gqa = "GQA by enable_gqa" if varlen.gqa else "GQA by expanding KV heads"
        return f"torch varlen_attn ({varlen.causal} causal, {gqa})"
    return {"chunked": "SDPA on query chunks (never the whole mask)",
            "flex": "FlexAttention (block mask from the document ids, compiled once per shape)",
            "dense": "SDPA with the whole additive mask"}[kernel]


def startup_line(cfg, device: torch.device, dtype: torch.dtype, cp_size: int) -> str:
    """The one start-up log line of ``--reset-attention-mask``: which kernel runs in training and why."""
    if cfg.use_flash_attn and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and cp_size == 1:
        return "megalite: document attention: flash-attn flash_attn_varlen_func because of --use-flash-attn"
    varlen, flex, capability = _cuda_kernels(device)
    kernel, reason = document_attention_kernel(device, dtype, cfg.attention_dropout, cp_size > 1, varlen, flex,
                                               capability)
    return f"megalite: document attention: {describe(kernel, varlen)} because {reason}"


# -- the dispatcher ----------------------------------------------------------------------------
def document_attention(q, k, v, document_mask, dropout: float) -> torch.Tensor:
    """Attention of ``q [s_q, b, n, d]`` within documents against ``k, v [s_k, b, g, d]``; returns
    ``[s_q, b, n*d]``. ``document_mask``: a :class:`~.document_mask.DocumentMask`; one with query /
    key positions (context parallelism: keys = the gathered sequence) is taken too."""
    return KERNELS[choose_kernel(q, dropout, document_mask)[0]](q, k, v, document_mask, dropout)


def choose_kernel(q, dropout: float, document_mask) -> tuple[str, str]:
    """:func:`document_attention_kernel` for this call's tensors and this torch."""
    return document_attention_kernel(q.device, q.dtype, dropout, document_mask.query_positions is not None,
                                     *_cuda_kernels(q.device))


def _cuda_kernels(device: torch.device) -> tuple[VarlenSignature | None, bool, tuple[int, int] | None]:
    """``(varlen signature, flex usable, capability)`` on CUDA; nothing is looked up on the CPU
    (importing torch's varlen module imports dynamo: seconds at start-up)."""
    if device.type != "cuda":
        return None, False, None
    return (varlen_signature(installed_varlen_attn()), flex_usable(device),
            tuple(torch.cuda.get_device_capability(device)))


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


def dense_document_attention(q, k, v, document_mask, dropout: float) -> torch.Tensor:
    """The last fallback: one SDPA call with the whole ``[b, 1, s_q, s_k]`` additive mask."""
    s, b = q.shape[:2]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask.additive(q.dtype), dropout_p=dropout,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


# -- variable-length kernels (cu_seqlens) ------------------------------------------------------
def varlen_attention(q, k, v, document_mask, dropout: float, kernel) -> torch.Tensor:
    """Causal attention within each document, by a variable-length ``kernel``: the documents of
    all samples are laid end to end (``[b*s, heads, d]``, THD) and delimited by the mask's
    ``cu_seqlens``. ``kernel(q, k, v, cu_seqlens, max_seqlen, dropout) -> [b*s, n, d]``."""
    s, b = q.shape[:2]
    cu_seqlens, max_seqlen = document_mask.varlen()
    q, k, v = (t.transpose(0, 1).reshape(b * s, t.shape[2], t.shape[3]) for t in (q, k, v))
    out = kernel(q, k, v, cu_seqlens, max_seqlen, dropout)
    return out.reshape(b, s, -1).transpose(0, 1).contiguous()


def torch_varlen_attention(q, k, v, document_mask, dropout: float = 0.0,
                           signature: VarlenSignature | None = None) -> torch.Tensor:
    """:func:`varlen_attention` by torch's ``varlen_attn``, called as its ``signature`` (default:
    the installed one's) asks. No dropout (the kernel has none)."""
    if dropout:
        raise ValueError("torch's varlen_attn has no dropout; use chunked_document_attention")
    signature = signature or varlen_signature(installed_varlen_attn())
    return varlen_attention(q, k, v, document_mask, dropout, functools.partial(_torch_varlen, signature=signature))


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen: int, dropout: float, signature: VarlenSignature):
    varlen_attn = installed_varlen_attn()  # looked up per call: tests swap in each release's signature
    kwargs = {"window_size": (-1, 0)} if signature.causal == "window_size" else {"is_causal": True}
    if k.shape[1] != q.shape[1]:
        if signature.gqa:
            kwargs["enable_gqa"] = True
        else:
            k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def expand_kv_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[T, g, d]`` key/value heads -> ``[T, heads, d]``: query head ``h`` gets group
    ``h // (heads / g)`` (megalite's and SDPA's GQA order)."""
    return t.repeat_interleave(heads // t.shape[1], dim=1)


# -- FlexAttention -----------------------------------------------------------------------------
def flex_document_attention(q, k, v, document_mask, dropout: float = 0.0,
                            block_size: int = FLEX_BLOCK_SIZE) -> torch.Tensor:
    """Attention within documents by FlexAttention and :func:`flex_block_mask` (built once per
    micro-batch, shared by the layers). On CUDA the compiled kernel (:func:`compiled_flex_attention`)
    visits only the blocks the mask keeps; elsewhere flex's eager reference runs (forward only on
    the CPU: torch refuses its backward there). No dropout (flex has none)."""
    from torch.nn.attention.flex_attention import flex_attention

    if dropout:
        raise ValueError("FlexAttention has no dropout; use chunked_document_attention")
    s, b = q.shape[:2]
    block_mask = document_mask.memo(("flex", block_size), lambda: flex_block_mask(document_mask, block_size))
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
    kernel = compiled_flex_attention() if q.is_cuda else flex_attention
    out = kernel(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


@functools.cache
def compiled_flex_attention():
    """``torch.compile(flex_attention)``, made once per process. Module-level on purpose: the
    compiled kernel depends only on shapes and dtypes (never on a model or its state), dynamo
    keeps one graph per shape (``dynamic=False``: a new shape, e.g. a shorter last batch,
    compiles once more instead of turning every later call dynamic), and a per-model or
    per-layer wrapper would compile the same kernel again for each."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(document_mask, block_size: int = FLEX_BLOCK_SIZE):
    """FlexAttention's ``BlockMask`` of ``document_mask`` (queries against keys, positions
    respected under CP), from per-block ranges of the ids and positions: ``[b, s_q/B, s_k/B]``
    booleans, never an ``[s_q, s_k]`` tensor. A block is *full* (no mask evaluated) when its
    queries and keys all share one document and its earliest query is not before its latest
    key; *partial* when the id ranges overlap and its latest query is not before its earliest
    key (a superset of the blocks with an allowed pair: exact without CP); else skipped."""
    from torch.nn.attention.flex_attention import BlockMask

    s_q, s_k = document_mask.query_ids.shape[1], document_mask.key_ids.shape[1]
    q_pos, k_pos = _positions(document_mask)
    q_lo, q_hi = _block_ranges(document_mask.query_ids, block_size)
    k_lo, k_hi = _block_ranges(document_mask.key_ids, block_size)
    qp_lo, qp_hi = _block_ranges(q_pos, block_size)
    kp_lo, kp_hi = _block_ranges(k_pos, block_size)
    overlap = (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
    some = overlap & (qp_hi[:, None] >= kp_lo[None, :])
    one_document = (q_lo == q_hi)[:, :, None] & (k_lo == k_hi)[:, None, :] & (q_lo[:, :, None] == k_lo[:, None, :])
    # Blocks with padding are never full (defensive: torch 2.13's kernel also masks keys past s_k
    # in full blocks, but that is not a documented guarantee).
    whole_q = torch.arange(q_lo.shape[1], device=q_lo.device) < s_q // block_size
    whole_k = torch.arange(k_lo.shape[1], device=k_lo.device) < s_k // block_size
    full = one_document & (qp_lo[:, None] >= kp_hi[None, :]) & whole_q[:, None] & whole_k[None, :]
    return BlockMask.from_kv_blocks(*_ordered(some & ~full), *_ordered(full), BLOCK_SIZE=block_size,
                                    mask_mod=_document_mask_mod(document_mask, q_pos, k_pos, block_size),
                                    seq_lengths=(s_q, s_k))


def _positions(document_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence positions of queries and keys (``0..s-1`` without CP)."""
    device = document_mask.query_ids.device
    q_pos, k_pos = document_mask.query_positions, document_mask.key_positions
    return (torch.arange(document_mask.query_ids.shape[1], device=device) if q_pos is None else q_pos,
            torch.arange(document_mask.key_ids.shape[1], device=device) if k_pos is None else k_pos)


def _pad(x: torch.Tensor, block_size: int, value=None) -> torch.Tensor:
    """``x [..., s]`` padded to whole blocks with ``value`` (None: its last element)."""
    pad = -x.shape[-1] % block_size
    fill = x[..., -1:].expand(*x.shape[:-1], pad) if value is None else x.new_full((*x.shape[:-1], pad), value)
    return torch.cat([x, fill], dim=-1) if pad else x


def _block_ranges(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of ``block_size`` along the last dim: (min, max) of ``x`` (padding ignored)."""
    blocks = _pad(x, block_size).unflatten(-1, (-1, block_size))
    return blocks.amin(dim=-1), blocks.amax(dim=-1)


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[b, nq, nk]`` bool -> flex's ``(num_blocks [b, 1, nq], indices [b, 1, nq, nk])``, int32,
    the kept key blocks of each query block first."""
    count = blocks.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.int32), dim=-1, descending=True, stable=True).to(torch.int32)
    return count[:, None].contiguous(), indices[:, None].contiguous()


def _document_mask_mod(document_mask, q_pos, k_pos, block_size: int):
    """Flex's ``mask_mod``: same document and the key not later in the sequence. The tensors are
    padded to whole blocks (ids that match nothing), so padded indices stay in bounds."""
    q_ids = _pad(document_mask.query_ids, block_size, -1)
    k_ids = _pad(document_mask.key_ids, block_size, -2)
    q_pos, k_pos = _pad(q_pos, block_size, 0), _pad(k_pos, block_size, 0)

    def mask_mod(b, h, q, k):
        return (q_ids[b, q] == k_ids[b, k]) & (q_pos[q] >= k_pos[k])
    return mask_mod


KERNELS = {"chunked": chunked_document_attention, "varlen": torch_varlen_attention,
           "flex": flex_document_attention, "dense": dense_document_attention}
