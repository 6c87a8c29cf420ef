#!/usr/bin/env python
"""Tokenize a jsonl corpus into Megatron-Core ``.bin/.idx`` files (Megatron's flags).

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \\
        --output-prefix out --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json \\
        --merge-file merges.txt --append-eod --workers 2

writes ``out_text_document.bin/.idx`` (``_sentence`` with --split-sentences). Input may be
gzipped (``.gz``). Lines are streamed and tokenized by a process pool in order, so the output
is identical for any --workers and memory does not grow with the corpus. A malformed line
(bad JSON or UTF-8, missing key, non-string value, untokenizable text) stops the run with
``file:line: reason`` and leaves no output files, or with --skip-bad-lines is reported, counted
and skipped. Documents that tokenize to nothing are skipped and counted.

Imports numpy and megalite.data only: no torch, no training code.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import multiprocessing
import os
import re
import sys
import time

# Run from a checkout: use this checkout's megalite (even if another one is installed).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "megalite")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import numpy as np

from megalite.data.indexed_dataset import IndexedDatasetBuilder, optimal_dtype
from megalite.data.tokenizers import TOKENIZER_TYPES, build_tokenizer

# Lines per task sent to a worker, and tasks in flight per worker: enough to keep workers busy
# while bounding how much of the corpus sits in memory.
CHUNK_LINES = 64
TASKS_PER_WORKER = 4
# Sentence ends: ., ! or ? followed by whitespace (a simple stand-in for NLTK punkt).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_MAX_BAD_LINE_REPORTS = 20


def get_args(argv=None):
    """Parse the command line (Megatron's preprocess_data.py flag names)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, help="jsonl file, optionally .gz")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys to extract from each json line (default: text)")
    g.add_argument("--split-sentences", action="store_true",
                   help="store each sentence as its own sequence (documents kept as documents)")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="report, count and skip malformed lines instead of stopping")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--vocab-file", help="GPT2BPETokenizer vocab.json")
    g.add_argument("--merge-file", help="GPT2BPETokenizer merges.txt")
    g.add_argument("--tokenizer-model", help="sentencepiece .model or HF tokenizer.json (or dir)")
    g.add_argument("--vocab-size", type=int, help="NullTokenizer vocabulary size")
    g.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document token to every document")
    g = p.add_argument_group("output and runtime")
    g.add_argument("--output-prefix", required=True, help="output path without suffix")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    g.add_argument("--log-interval", type=int, default=1000,
                   help="progress line every this many documents (stderr)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    if args.log_interval < 1:
        p.error("--log-interval must be >= 1")
    return args


class Encoder:
    """Turns raw jsonl lines into token arrays; one instance per worker process."""

    def __init__(self, args, dtype):
        self.keys = args.json_keys
        self.split_sentences = args.split_sentences
        self.append_eod = args.append_eod
        self.dtype = dtype
        self.spec = dict(tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file,
                         merge_file=args.merge_file, tokenizer_model=args.tokenizer_model,
                         vocab_size=args.vocab_size)
        self.tokenizer = None

    def initializer(self):
        """Build the tokenizer in the worker (tokenizer objects are not sent between processes)."""
        self.tokenizer = build_tokenizer(**self.spec)

    def encode_line(self, raw: bytes):
        """(status, payload): ("ok", {key: (ids, sentence_lengths)}), ("blank", None) or
        ("bad", reason)."""
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return "bad", f"invalid UTF-8 ({e.reason} at byte {e.start})"
        if not line.strip():
            return "blank", None
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            return "bad", f"invalid JSON ({e.msg} at column {e.colno})"
        if not isinstance(data, dict):
            return "bad", f"expected a JSON object, got {type(data).__name__}"
        out = {}
        for key in self.keys:
            if key not in data:
                return "bad", f"missing key {key!r}"
            text = data[key]
            if not isinstance(text, str):
                return "bad", f"value of {key!r} is {type(text).__name__}, not a string"
            parts = _SENTENCE_END.split(text) if self.split_sentences else [text]
            try:
                pieces = [self.tokenizer.tokenize_array(s) for s in parts]
            except ValueError as e:
                return "bad", f"cannot tokenize {key!r}: {e}"
            pieces = [s for s in pieces if s.size]
            lengths = [int(s.size) for s in pieces]
            ids = np.concatenate(pieces) if pieces else np.empty(0, np.int64)
            if ids.size and self.append_eod:
                ids = np.append(ids, self.tokenizer.eod)
                lengths[-1] += 1
            out[key] = (ids.astype(self.dtype), lengths)
        return "ok", out

    def encode_chunk(self, chunk):
        """Encode ``[(line_no, raw), ...]`` -> ``[(line_no, nbytes, status, payload), ...]``."""
        return [(n, len(raw), *self.encode_line(raw)) for n, raw in chunk]


_ENCODER = None


def _worker_init(encoder):
    global _ENCODER
    _ENCODER = encoder
    encoder.initializer()


def _worker_encode(chunk):
    return _ENCODER.encode_chunk(chunk)


def _chunks(f, size):
    chunk = []
    for n, raw in enumerate(f, 1):
        chunk.append((n, raw))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encoded(args, encoder, f):
    """Encoded chunks in input order. Pool.imap would read the whole input ahead (its feeder
    thread does not wait for results), so at most TASKS_PER_WORKER tasks per worker are kept
    in flight here: memory stays bounded whatever the corpus size."""
    if args.workers == 1:
        encoder.initializer()
        for chunk in _chunks(f, CHUNK_LINES):
            yield encoder.encode_chunk(chunk)
        return
    with multiprocessing.Pool(args.workers, initializer=_worker_init, initargs=(encoder,)) as pool:
        pending = collections.deque()
        for chunk in _chunks(f, CHUNK_LINES):
            pending.append(pool.apply_async(_worker_encode, (chunk,)))
            if len(pending) >= args.workers * TASKS_PER_WORKER:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class BadLine(Exception):
    """A malformed input line when --skip-bad-lines is off."""


def _open_input(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input: file not found: {path}")
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz or path.endswith(".gz") else open(path, "rb")


def preprocess(args) -> dict:
    """Run the conversion described by ``args``; returns the counts. Raises BadLine/ValueError."""
    tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file,
                                args.tokenizer_model, args.vocab_size)
    if args.append_eod:
        tokenizer.require_eod()
    dtype = optimal_dtype(tokenizer.vocab_size)
    level = "sentence" if args.split_sentences else "document"
    final = {k: f"{args.output_prefix}_{k}_{level}" for k in args.json_keys}
    tmp = {k: f"{p}.tmp-{os.getpid()}" for k, p in final.items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    counts = {"read": 0, "bad": 0, "blank": 0, "empty": dict.fromkeys(args.json_keys, 0),
              "written": dict.fromkeys(args.json_keys, 0), "tokens": dict.fromkeys(args.json_keys, 0)}
    builders, encoded = {}, None
    try:
        for k in args.json_keys:
            builders[k] = IndexedDatasetBuilder(tmp[k] + ".bin", dtype=dtype)
        encoder = Encoder(args, dtype)
        start, nbytes = time.time(), 0
        with _open_input(args.input) as f:
            encoded = _encoded(args, encoder, f)
            for results in encoded:
                for line_no, size, status, payload in results:
                    nbytes += size
                    if status == "blank":
                        counts["blank"] += 1
                        continue
                    counts["read"] += 1
                    if status == "bad":
                        msg = f"{args.input}:{line_no}: {payload}"
                        if not args.skip_bad_lines:
                            raise BadLine(msg + " (use --skip-bad-lines to skip such lines)")
                        counts["bad"] += 1
                        if counts["bad"] <= _MAX_BAD_LINE_REPORTS:
                            print(f"skipping {msg}", file=sys.stderr)
                        elif counts["bad"] == _MAX_BAD_LINE_REPORTS + 1:
                            print("skipping further bad lines without reporting each",
                                  file=sys.stderr)
                    else:
                        for k, (ids, lengths) in payload.items():
                            if not ids.size:
                                counts["empty"][k] += 1
                                continue
                            builders[k].add_document(ids, lengths)
                            counts["written"][k] += 1
                            counts["tokens"][k] += int(ids.size)
                    if counts["read"] % args.log_interval == 0:
                        el = max(time.time() - start, 1e-9)
                        print(f"Processed {counts['read']} documents ({counts['read'] / el:.1f} "
                              f"docs/s, {nbytes / el / 1024 / 1024:.2f} MB/s).", file=sys.stderr)
        for k in args.json_keys:
            builders[k].finalize(tmp[k] + ".idx")
            os.replace(tmp[k] + ".bin", final[k] + ".bin")
            os.replace(tmp[k] + ".idx", final[k] + ".idx")
    finally:
        if encoded is not None:
            encoded.close()  # stops the worker pool at once on an error
        for k in args.json_keys:
            if k in builders and not builders[k].data_file.closed:
                builders[k].data_file.close()
            for suffix in (".bin", ".idx"):
                if os.path.exists(tmp[k] + suffix):
                    os.remove(tmp[k] + suffix)
    counts["seconds"] = time.time() - start
    counts["bytes"] = nbytes
    counts["outputs"] = final
    return counts


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    args = get_args(argv)
    try:
        c = preprocess(args)
    except (BadLine, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for k, prefix in c["outputs"].items():
        print(f"{k}: wrote {c['written'][k]} documents, {c['tokens'][k]} tokens to "
              f"{prefix}.bin/.idx ({c['empty'][k]} empty documents skipped)")
    skipped = c["bad"] + max(c["empty"].values())
    print(f"done: read {c['read']} documents, skipped {skipped} ({c['bad']} bad lines, "
          f"{max(c['empty'].values())} empty), ignored {c['blank']} blank lines; "
          f"{c['bytes'] / 1e6:.1f} MB in {c['seconds']:.1f} s "
          f"({c['bytes'] / 1e6 / max(c['seconds'], 1e-9):.2f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
