"""The attention mask of packed documents (``--reset-attention-mask``), built once per micro-batch.

A sample that packs several documents must not let a token attend across a document boundary.
The data gives each input token its document id (``megalite.data.document_masks``); a query
may attend to a key when the key is not later in the sequence *and* has the same document id:
a block-diagonal causal mask. :class:`DocumentMask` holds the ids of one micro-batch and hands
each attention kernel the form it needs, built at most once and shared by every layer and head
(a boolean mask handed to SDPA would be converted to a float copy in every layer):

* :meth:`DocumentMask.query_chunks` (CPU): the queries in chunks, each with the range of keys
  it can see (from the first document start in the chunk to the chunk's end) and the additive
  mask of just that block, so SDPA skips most of what the block-diagonal mask would zero;
* :meth:`DocumentMask.additive`: the whole ``[b, 1, s_q, s_k]`` additive mask (0 or -inf, in the
  activations' dtype, broadcast over the heads), for SDPA on CUDA and under context parallelism;
* :meth:`DocumentMask.varlen`: ``cu_seqlens`` (int32 starts of every document of every sample,
  laid end to end) for variable-length kernels (flash-attn's ``flash_attn_varlen_func``, torch's
  ``varlen_attn`` on CUDA);
* :meth:`DocumentMask.memo`: any other form, built by its kernel's module once per micro-batch
  (FlexAttention's block mask, :func:`.document_attention.flex_block_mask`).

Which kernel takes which form, when: :mod:`.document_attention`.

Under context parallelism the ids are cut with the CP chunks like the tokens (the load balance
is unchanged); :meth:`DocumentMask.for_stage` all-gathers them over the CP group once per
micro-batch, so each rank's queries see the document ids of the whole sequence's keys, and
causality uses the tokens' global sequence positions.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .context_parallel import gather_positions, local_positions


class DocumentMask:
    """Block-diagonal causal mask of one micro-batch.

    ``query_ids [b, s_q]`` / ``key_ids [b, s_k]``: document ids of the queries and keys (the
    same tensor without CP); ``query_positions [s_q]`` / ``key_positions [s_k]``: their
    positions in the sequence, for causality (None: ``0..s-1``).
    """

    def __init__(self, query_ids: torch.Tensor, key_ids: torch.Tensor | None = None,
                 query_positions: torch.Tensor | None = None, key_positions: torch.Tensor | None = None):
        self.query_ids = query_ids
        self.key_ids = query_ids if key_ids is None else key_ids
        self.query_positions, self.key_positions = query_positions, key_positions
        self._additive: dict[torch.dtype, torch.Tensor] = {}
        self._chunks: dict[tuple[int, torch.dtype], list] = {}
        self._varlen: tuple[torch.Tensor, int] | None = None
        self._memo: dict = {}

    @classmethod
    def for_stage(cls, document_ids: torch.Tensor | None, pstate) -> "DocumentMask | None":
        """The mask of a micro-batch's ``document_ids`` (this CP rank's chunks); None without ids."""
        if document_ids is None:
            return None
        if pstate.cp_size == 1:
            return cls(document_ids)
        parts = [torch.empty_like(document_ids) for _ in range(pstate.cp_size)]
        dist.all_gather(parts, document_ids.contiguous(), group=pstate.cp_group)
        s = document_ids.shape[1]
        return cls(document_ids, torch.cat(parts, dim=1),
                   local_positions(s * pstate.cp_size, pstate.cp_rank, pstate.cp_size, document_ids.device),
                   gather_positions(s, pstate.cp_size, document_ids.device))

    def allowed(self, queries: slice = slice(None), keys: slice = slice(None)) -> torch.Tensor:
        """``[b, 1, s_q, s_k]`` bool (of the given query / key ranges), True where the query may
        attend to the key: same document, and the key not later in the sequence."""
        device = self.query_ids.device
        q_pos = self.query_positions if self.query_positions is not None else torch.arange(
            self.query_ids.shape[1], device=device)
        k_pos = self.key_positions if self.key_positions is not None else torch.arange(
            self.key_ids.shape[1], device=device)
        causal = q_pos[queries, None] >= k_pos[None, keys]
        same_document = self.query_ids[:, queries, None] == self.key_ids[:, None, keys]
        return (same_document & causal).unsqueeze(1)

    def additive(self, dtype: torch.dtype, queries: slice = slice(None), keys: slice = slice(None)) -> torch.Tensor:
        """:meth:`allowed` as an additive mask in ``dtype``: 0 where allowed, -inf elsewhere
        (every query may attend to itself, so no row is all -inf). The whole mask is cached."""
        whole = queries == slice(None) and keys == slice(None)
        if whole and dtype in self._additive:
            return self._additive[dtype]
        allowed = self.allowed(queries, keys)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
        if whole:
            self._additive[dtype] = mask
        return mask

    def query_chunks(self, size: int, dtype: torch.dtype) -> list[tuple[int, int, int, torch.Tensor]]:
        """``(start, end, key_start, mask)`` per chunk of ``size`` queries: no query of
        ``[start, end)`` can see a key before ``key_start`` (the earliest start, over the batch,
        of the documents of the chunk's first queries) nor after ``end``; ``mask`` is the
        additive mask of that block. Cached; whole sequences only (not under CP)."""
        if self.query_positions is not None:
            raise ValueError("query chunks take whole sequences; under context parallelism use the whole mask")
        if (size, dtype) not in self._chunks:
            ids, starts = self.query_ids, self._document_starts()
            s = ids.shape[1]
            index = torch.arange(s, device=ids.device).expand_as(ids)
            document_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
            firsts = document_start[:, ::size].amin(dim=0).tolist()  # one device-to-host copy
            self._chunks[(size, dtype)] = [
                (a, min(a + size, s), k, self.additive(dtype, slice(a, min(a + size, s)), slice(k, min(a + size, s))))
                for a, k in zip(range(0, s, size), firsts)]
        return self._chunks[(size, dtype)]

    def varlen(self) -> tuple[torch.Tensor, int]:
        """``(cu_seqlens, max_seqlen)`` of the documents of all samples laid end to end (THD
        layout, sample after sample): int32 ``[n_docs + 1]`` starts, and an upper bound of the
        longest document (the sample length, known without reading the ids back). Not under CP."""
        if self.query_positions is not None:
            raise ValueError("variable-length attention takes whole sequences; under context "
                             "parallelism use the whole mask")
        if self._varlen is None:
            b, s = self.query_ids.shape
            first = self._document_starts().reshape(-1).nonzero().reshape(-1)
            end = torch.tensor([b * s], device=first.device, dtype=first.dtype)
            self._varlen = (torch.cat([first, end]).to(torch.int32), s)
        return self._varlen

    def memo(self, key, build):
        """``build()``, called once per ``key`` for this micro-batch and then shared (by every layer)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def _document_starts(self) -> torch.Tensor:
        """``[b, s]`` bool: True where a document begins (each sample's first token, and the
        token after each EOD)."""
        ids = self.query_ids
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        return starts
