"""Packed documents: where each document of a sample starts, its positions and its loss mask.

Pretraining samples are cut from documents laid end to end, so one sample holds the end of a
document, a few whole ones and the start of the next, separated by the tokenizer's
end-of-document token (EOD). Megatron-LM's three flags, computed here per sample (numpy) as
megatron-core's ``gpt_dataset._get_ltor_masks_and_position_ids`` does, on the *input* tokens
(``sample[:-1]``):

* ``--reset-position-ids``: positions restart at 0 after each EOD (the EOD itself keeps the
  position of the document it ends);
* ``--reset-attention-mask``: a token attends only to earlier tokens of its own document; the
  EOD belongs to the document it ends. Carried as ``document_ids`` (the number of EODs before
  each token), from which the model builds its block-diagonal causal mask;
* ``--eod-mask-loss``: the loss is masked at the positions whose *input* is an EOD (there the
  model would predict the first token of the next document from the previous one). The EOD as
  a *target* (predicting the end of a document) stays trained, as in Megatron.

:class:`DocumentMaskedDataset` wraps any dataset of samples (token arrays, or dicts with a
``loss_mask``) and adds these fields, so the trainer carries them with each micro-batch.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

PACKED_DOCUMENT_FLAGS = ("--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss")


def document_ids(tokens: np.ndarray, eod: int) -> np.ndarray:
    """For each position, the number of EOD tokens strictly before it (int64): tokens of one
    document share an id, and an EOD has the id of the document it ends."""
    is_eod = np.asarray(tokens) == eod
    ids = np.cumsum(is_eod, dtype=np.int64)
    return ids - is_eod


def reset_position_ids(doc_ids: np.ndarray) -> np.ndarray:
    """Positions counted from the start of each token's document (``doc_ids`` non-decreasing)."""
    n = doc_ids.shape[0]
    index = np.arange(n, dtype=np.int64)
    starts = np.flatnonzero(np.diff(doc_ids, prepend=-1))  # first position of each document
    return index - np.repeat(starts, np.diff(np.append(starts, n)))


def ltor_masks_and_position_ids(tokens: np.ndarray, eod: int, reset_position_ids_: bool,
                                reset_attention_mask: bool, eod_mask_loss: bool
                                ) -> tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
    """``(document_ids or None, loss_mask, position_ids)`` of the input tokens ``[s]``.

    The same semantics as megatron-core's ``_get_ltor_masks_and_position_ids`` (which returns
    a dense ``[1, s, s]`` attention mask where this returns the document ids it is made of):
    ``document_ids`` only with ``reset_attention_mask``; ``loss_mask`` (float32) is 0 where
    the input token is the EOD, with ``eod_mask_loss``; ``position_ids`` restart after each
    EOD with ``reset_position_ids_``, else ``0..s-1``.
    """
    tokens = np.asarray(tokens)
    loss_mask = np.ones(tokens.shape[0], dtype=np.float32)
    if eod_mask_loss:
        loss_mask[tokens == eod] = 0.0
    ids = document_ids(tokens, eod) if reset_position_ids_ or reset_attention_mask else None
    positions = reset_position_ids(ids) if reset_position_ids_ else np.arange(tokens.shape[0], dtype=np.int64)
    return (ids if reset_attention_mask else None), loss_mask, positions


class DocumentMaskedDataset:
    """``dataset`` with the fields of the packed-document flags added to each sample.

    A sample becomes ``{"tokens": seq + 1 ids, "loss_mask": seq weights}`` plus
    ``"position_ids"`` (``reset_position_ids``) and ``"document_ids"``
    (``reset_attention_mask``), each ``seq`` long and describing the input tokens
    ``tokens[:-1]``. A loss mask the wrapped dataset already has (SFT data) is multiplied by the
    EOD mask. ``eod`` is the tokenizer's end-of-document id.
    """

    def __init__(self, dataset, eod: int, reset_position_ids: bool = False,
                 reset_attention_mask: bool = False, eod_mask_loss: bool = False):
        if eod is None:
            raise ValueError(f"{'/'.join(PACKED_DOCUMENT_FLAGS)} need a tokenizer with an end-of-document token")
        self.dataset, self.eod = dataset, int(eod)
        self.reset_position_ids, self.reset_attention_mask = reset_position_ids, reset_attention_mask
        self.eod_mask_loss = eod_mask_loss

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        sample = self.dataset[idx]
        tokens = np.asarray(sample["tokens"] if isinstance(sample, dict) else sample)
        doc_ids, loss_mask, positions = ltor_masks_and_position_ids(
            tokens[:-1], self.eod, self.reset_position_ids, self.reset_attention_mask, self.eod_mask_loss)
        if isinstance(sample, dict):
            loss_mask = loss_mask * np.asarray(sample["loss_mask"], dtype=np.float32)
        out = {"tokens": tokens, "loss_mask": loss_mask}
        if self.reset_position_ids:
            out["position_ids"] = positions
        if doc_ids is not None:
            out["document_ids"] = doc_ids
        return out
