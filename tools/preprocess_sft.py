#!/usr/bin/env python
"""Tokenize SFT examples (prompt/response or chat messages) into packed ``.bin/.idx`` files with a loss mask.

    python tools/preprocess_sft.py --input sft.jsonl --output-prefix out --seq-length 1024 \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt

Each jsonl line is ``{"prompt": ..., "response": ...}`` or ``{"messages": [{"role": "user",
"content": ...}, {"role": "assistant", "content": ...}, ...]}`` (key names: --prompt-key,
--response-key, --messages-key). An example becomes its tokens followed by the end-of-document
token (EOD), with a loss mask that is 1 on the response (the bodies of assistant messages) and
that EOD, 0 elsewhere (megalite.data.sft). Examples longer than ``--seq-length + 1`` tokens are
truncated (counted; one left without any response token is skipped). Whole examples are then
packed with first-fit into sequences of exactly ``--seq-length + 1`` tokens, padded with EODs
(loss mask 0), and written as

    out_sft_document.bin/.idx            the packed tokens (one pack per sequence and document)
    out_sft_document_loss_mask.bin/.idx  its loss mask (uint8), the same lengths

Train with ``pretrain_gpt.py --data-path out_sft_document --seq-length`` (the same) and the
packed-document flags ``--reset-attention-mask --reset-position-ids``, so the examples of a pack
do not see each other. Malformed lines stop the run with ``file:line: reason`` (no output
files), or are reported, counted and skipped with --skip-bad-lines. Imports numpy and
megalite.data only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# Run from a checkout: use this checkout's megalite, and its sibling tools/preprocess_data.py.
_TOOLS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TOOLS)
if os.path.isdir(os.path.join(_ROOT, "megalite")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
if _TOOLS not in sys.path:
    sys.path.insert(0, _TOOLS)

import numpy as np

from megalite.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, optimal_dtype
from megalite.data.sft import encode_messages, encode_prompt_response, first_fit, loss_mask_prefix, packs
from megalite.data.tokenizers import TOKENIZER_TYPES, build_tokenizer
from preprocess_data import BadLine, _open_input

_MAX_BAD_LINE_REPORTS = 20


def get_args(argv=None):
    """Parse the command line (tokenizer flags as tools/preprocess_data.py)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="jsonl file, optionally .gz")
    p.add_argument("--output-prefix", required=True, help="output path without suffix")
    p.add_argument("--seq-length", type=int, required=True, help="training --seq-length: packs hold seq + 1 tokens")
    p.add_argument("--prompt-key", default="prompt")
    p.add_argument("--response-key", default="response")
    p.add_argument("--messages-key", default="messages", help="chat examples: a list of {role, content}")
    p.add_argument("--skip-bad-lines", action="store_true", help="report, count and skip malformed lines")
    p.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    p.add_argument("--vocab-file")
    p.add_argument("--merge-file")
    p.add_argument("--tokenizer-model")
    p.add_argument("--vocab-size", type=int)
    args = p.parse_args(argv)
    if args.seq_length < 1:
        p.error("--seq-length must be >= 1")
    return args


def encode_line(args, tokenizer, raw: bytes):
    """``(ids, mask)`` of one jsonl line, or raises ValueError with the reason it is malformed."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"invalid JSON or UTF-8 ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    if args.messages_key in data:
        return encode_messages(tokenizer, data[args.messages_key])
    for key in (args.prompt_key, args.response_key):
        if not isinstance(data.get(key), str):
            raise ValueError(f"needs string {args.prompt_key!r} and {args.response_key!r} (or a "
                             f"{args.messages_key!r} list); {key!r} is {type(data.get(key)).__name__}")
    return encode_prompt_response(tokenizer, data[args.prompt_key], data[args.response_key])


def tokenize(args, tokenizer, capacity: int, tmp: str, counts: dict) -> None:
    """Pass 1: every example, truncated to ``capacity``, as one sequence of ``tmp`` (+ its mask)."""
    tokens = IndexedDatasetBuilder(tmp + ".bin", dtype=optimal_dtype(tokenizer.vocab_size))
    masks = IndexedDatasetBuilder(loss_mask_prefix(tmp) + ".bin", dtype=np.uint8)
    try:
        _tokenize_lines(args, tokenizer, capacity, tokens, masks, counts)
    finally:
        tokens.data_file.close()
        masks.data_file.close()
    tokens.finalize(tmp + ".idx")
    masks.finalize(loss_mask_prefix(tmp) + ".idx")


def _tokenize_lines(args, tokenizer, capacity: int, tokens, masks, counts: dict) -> None:
    with _open_input(args.input) as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            counts["read"] += 1
            try:
                ids, mask = encode_line(args, tokenizer, raw)
            except ValueError as e:
                msg = f"{args.input}:{line_no}: {e}"
                if not args.skip_bad_lines:
                    raise BadLine(msg + " (use --skip-bad-lines to skip such lines)") from None
                counts["bad"] += 1
                if counts["bad"] <= _MAX_BAD_LINE_REPORTS:
                    print(f"skipping {msg}", file=sys.stderr)
                continue
            if ids.size > capacity:
                counts["truncated"] += 1
                ids, mask = ids[:capacity], mask[:capacity]
            if not mask[1:].any():  # nothing left to learn (the first token is never a target)
                counts["no_response"] += 1
                continue
            tokens.add_document(ids, [ids.size])
            masks.add_document(mask, [mask.size])
            counts["examples"] += 1


class _Examples:
    """``examples[i] -> (ids, mask)`` from the files of pass 1 (memory-mapped)."""

    def __init__(self, prefix: str):
        self.tokens, self.masks = IndexedDataset(prefix), IndexedDataset(loss_mask_prefix(prefix))

    def __getitem__(self, i: int):
        return self.tokens[i], self.masks[i]


def pack(tmp: str, out_tmp: str, capacity: int, eod: int, dtype, counts: dict) -> None:
    """Pass 2: first-fit the examples of ``tmp`` into packs of ``capacity``; write ``out_tmp``."""
    examples = _Examples(tmp)
    bins = first_fit(examples.tokens.sequence_lengths, capacity)
    tokens = IndexedDatasetBuilder(out_tmp + ".bin", dtype=dtype)
    masks = IndexedDatasetBuilder(loss_mask_prefix(out_tmp) + ".bin", dtype=np.uint8)
    for ids, mask in packs(examples, bins, capacity, eod):
        tokens.add_document(ids, [capacity])
        masks.add_document(mask, [capacity])
        counts["packs"] += 1
        counts["trained"] += int(mask[1:].sum())
    tokens.finalize(out_tmp + ".idx")
    masks.finalize(loss_mask_prefix(out_tmp) + ".idx")
    counts["tokens"] = int(examples.tokens.sequence_lengths.sum())


def preprocess(args) -> dict:
    """Tokenize and pack as ``args`` say; returns the counts. Raises BadLine / ValueError."""
    tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file,
                                args.tokenizer_model, args.vocab_size)
    if tokenizer.eod is None:
        raise ValueError(f"{args.tokenizer_type} has no end-of-document token, which ends every SFT example")
    capacity = args.seq_length + 1
    final = f"{args.output_prefix}_sft_document"
    os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
    examples, packed = f"{final}.examples-{os.getpid()}", f"{final}.tmp-{os.getpid()}"
    prefixes = (examples, loss_mask_prefix(examples), packed, loss_mask_prefix(packed))
    temporary = [prefix + suffix for prefix in prefixes for suffix in (".bin", ".idx")]
    counts = dict.fromkeys(("read", "bad", "truncated", "no_response", "examples", "packs", "trained", "tokens"), 0)
    try:
        tokenize(args, tokenizer, capacity, examples, counts)
        if not counts["examples"]:
            raise ValueError(f"{args.input}: no example with a response token to train on")
        pack(examples, packed, capacity, tokenizer.eod, optimal_dtype(tokenizer.vocab_size), counts)
        for src, dst in ((packed, final), (loss_mask_prefix(packed), loss_mask_prefix(final))):
            for suffix in (".bin", ".idx"):
                os.replace(src + suffix, dst + suffix)
    finally:
        for path in temporary:
            if os.path.exists(path):
                os.remove(path)
    counts["output"] = final
    return counts


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    args = get_args(argv)
    try:
        c = preprocess(args)
    except (BadLine, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    slots = c["packs"] * (args.seq_length + 1)
    print(f"wrote {c['packs']} packs of {args.seq_length + 1} tokens to {c['output']}.bin/.idx and "
          f"{loss_mask_prefix(c['output'])}.bin/.idx: {c['examples']} examples, {c['tokens']} tokens "
          f"({100 * c['tokens'] / max(slots, 1):.1f}% of the packs, the rest EOD padding), "
          f"{c['trained']} trained tokens")
    print(f"done: read {c['read']} examples; truncated {c['truncated']}; skipped {c['bad']} bad lines and "
          f"{c['no_response']} without a response token left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
