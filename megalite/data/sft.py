"""Supervised fine-tuning (SFT) data: prompt/response and chat examples, packed with a loss mask.

``tools/preprocess_sft.py`` turns jsonl examples into token ids plus a per-token loss mask (1 on
the response tokens the model is trained to produce, 0 on prompts and chat headers), packs
whole examples into sequences of exactly ``seq_length + 1`` tokens with first-fit, pads each
pack with the end-of-document token (EOD, loss mask 0) and writes two Megatron ``.bin/.idx``
pairs with the same sequence lengths:

* ``{prefix}.bin/.idx``: the packed tokens, one pack per sequence and document;
* ``{prefix}_loss_mask.bin/.idx`` (uint8): the loss mask of each token.

``--data-path {prefix}`` then trains on them: :func:`megalite.data.gpt_dataset.build_train_valid_test_datasets`
sees the loss-mask file and builds :class:`PackedSFTDataset` splits (sample ``i`` is one whole
pack, in a shuffled order), whose samples are ``{"tokens", "loss_mask"}`` dicts. Every example
ends with an EOD, so the packed-document flags (``--reset-attention-mask`` and
``--reset-position-ids``) keep the examples of a pack apart.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Iterator, Optional

import numpy as np

from megalite.data import cache
from megalite.data import index_builders as ib
from megalite.data.indexed_dataset import IndexedDataset, exists

LOSS_MASK_SUFFIX = "_loss_mask"
ROLES = ("system", "user", "assistant", "tool")
TRAINED_ROLE = "assistant"


def loss_mask_prefix(prefix: str) -> str:
    """The ``.bin/.idx`` prefix of the loss mask that belongs to the packed tokens at ``prefix``."""
    return prefix + LOSS_MASK_SUFFIX


def is_sft_dataset(prefix: str) -> bool:
    """Whether ``prefix`` is packed SFT data (its loss-mask files exist beside it)."""
    return exists(loss_mask_prefix(prefix))


# -- one example -> ids and loss mask ----------------------------------------------------------
def encode_prompt_response(tokenizer, prompt: str, response: str) -> tuple[np.ndarray, np.ndarray]:
    """``prompt + response + EOD`` as ``(ids int64, mask uint8)``: the response and the EOD after
    it are trained (mask 1); the prompt is context only (mask 0)."""
    p, r = tokenizer.tokenize_array(prompt), tokenizer.tokenize_array(response)
    ids = np.concatenate([p, r, [tokenizer.require_eod()]]).astype(np.int64)
    mask = np.concatenate([np.zeros(p.size, np.uint8), np.ones(r.size + 1, np.uint8)])
    return ids, mask


def render_message(role: str, content: str) -> tuple[str, str]:
    """The chat template, as ``(header, body)``: ``<|role|>\\n`` then the content and a newline."""
    return f"<|{role}|>\n", f"{content}\n"


def encode_messages(tokenizer, messages) -> tuple[np.ndarray, np.ndarray]:
    """A chat ``[{"role", "content"}, ...]`` as ``(ids int64, mask uint8)`` with the template of
    :func:`render_message` and an EOD at the end. The bodies of ``assistant`` messages are
    trained, and the EOD when the chat ends with one; headers and other roles are not.
    Raises ValueError on a malformed chat (the tool reports it with its line number)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    ids, mask = [], []
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {n} must be {{'role': one of {list(ROLES)}, 'content': a string}}")
        header, body = render_message(m["role"], m["content"])
        for text, trained in ((header, False), (body, m["role"] == TRAINED_ROLE)):
            piece = tokenizer.tokenize_array(text)
            ids.append(piece)
            mask.append(np.full(piece.size, trained, np.uint8))
    if not any(m["role"] == TRAINED_ROLE for m in messages):
        raise ValueError(f"no {TRAINED_ROLE!r} message: nothing to train on")
    ids.append(np.array([tokenizer.require_eod()]))
    mask.append(np.array([messages[-1]["role"] == TRAINED_ROLE], np.uint8))
    return np.concatenate(ids).astype(np.int64), np.concatenate(mask)


# -- packing -----------------------------------------------------------------------------------
def first_fit(lengths: Iterable[int], capacity: int) -> np.ndarray:
    """First-fit bin packing: each item, in order, goes to the first (lowest-numbered) bin with
    room left, a new bin when none has. Returns the bin of each item (bins numbered from 0 in
    order of opening). A max-tree over the bins' free room finds that bin in O(log n)."""
    lengths = [int(x) for x in lengths]
    if any(not 0 < x <= capacity for x in lengths):
        raise ValueError(f"every item must have 1..{capacity} tokens")
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [capacity] * (2 * size)  # free[node] = the most room in any bin below node
    bins = np.empty(len(lengths), dtype=np.int64)
    for i, length in enumerate(lengths):
        node = 1
        while node < size:  # descend to the leftmost leaf with room
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        bins[i] = node - size
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def packs(examples, bins: np.ndarray, capacity: int, pad: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(tokens, mask)`` of each bin in order: its examples (``examples[i] -> (ids, mask)``) in
    input order, then ``pad`` tokens with mask 0 up to ``capacity``."""
    order = np.argsort(bins, kind="stable")
    starts = np.searchsorted(bins[order], np.arange(int(bins.max()) + 1 if bins.size else 0))
    for b, start in enumerate(starts):
        end = starts[b + 1] if b + 1 < len(starts) else len(order)
        parts = [examples[int(i)] for i in order[start:end]]
        ids = np.concatenate([p[0] for p in parts]).astype(np.int64)
        mask = np.concatenate([p[1] for p in parts]).astype(np.uint8)
        fill = capacity - ids.size
        yield (np.concatenate([ids, np.full(fill, pad, np.int64)]),
               np.concatenate([mask, np.zeros(fill, np.uint8)]))


# -- training side -----------------------------------------------------------------------------
class PackedSFTDataset:
    """Samples of packed SFT data: sample ``i`` is one whole pack of ``seq_length + 1`` tokens,
    as ``{"tokens": int64 [seq + 1], "loss_mask": float32 [seq]}`` (the mask of the labels,
    ``tokens[1:]``). The packs ``indices`` (this split's) are repeated for as many epochs as
    ``num_samples`` needs, each epoch in its own random order (``seed``); None: one epoch."""

    def __init__(self, prefix: str, indices: np.ndarray, num_samples: Optional[int], split_name: str,
                 seq_length: int, seed: int):
        self.prefix, self.split_name = prefix, split_name
        self.tokens, self.masks = IndexedDataset(prefix), IndexedDataset(loss_mask_prefix(prefix))
        if not np.array_equal(self.tokens.sequence_lengths, self.masks.sequence_lengths):
            raise ValueError(f"{prefix}: the loss mask {loss_mask_prefix(prefix)} does not match the tokens "
                             "(different sequence lengths); preprocess again")
        lengths = set(np.unique(self.tokens.sequence_lengths).tolist())
        if lengths != {seq_length + 1}:
            raise ValueError(f"{prefix}: packed SFT sequences have {sorted(lengths)} tokens, but --seq-length "
                             f"{seq_length} needs {seq_length + 1}: run tools/preprocess_sft.py with "
                             f"--seq-length {seq_length}")
        n = len(indices)
        total = n if num_samples is None else int(num_samples)
        rng = np.random.RandomState(seed)
        epochs = [rng.permutation(np.asarray(indices, dtype=np.int64)) for _ in range(max(1, math.ceil(total / n)))]
        self.order = np.concatenate(epochs)[:total]
        self.description, self.description_hash = cache.describe({
            "class": "PackedSFTDataset", "dataset_path": os.path.abspath(prefix), "split": split_name,
            "packs": [int(indices[0]), int(indices[-1]) + 1], "num_samples": total, "seed": seed,
            "idx_bytes": os.path.getsize(prefix + ".idx")})

    def __len__(self) -> int:
        return int(self.order.shape[0])

    def __getitem__(self, idx: int) -> dict:
        j = int(self.order[idx])
        return {"tokens": self.tokens[j].astype(np.int64),
                "loss_mask": self.masks[j][1:].astype(np.float32)}


def build_sft_splits(prefix: str, matrix, num_samples, seq_length: int, seed: int) -> list:
    """The train / valid / test :class:`PackedSFTDataset` of ``prefix`` (None for an empty split);
    ``--split`` divides the packs in order, as it divides the documents of pretraining data."""
    n = len(IndexedDataset(prefix))
    out = []
    for name, indices, count in zip(ib.SPLIT_NAMES, ib.split_indices(matrix, n), num_samples):
        if indices is None or not len(indices):
            if name == "train":
                raise ValueError(f"{prefix}: the train split holds no packs ({n} in all)")
            out.append(None)
            continue
        out.append(PackedSFTDataset(prefix, indices, count, name, seq_length, seed))
    return out
