#!/usr/bin/env python
"""Throughput of tools/preprocess_data.py at 1 and 2 workers, side by side.

    python benchmarks/preprocess.py [--size-mb 50] [--tokenizer byte gpt2bpe]

Writes a synthetic jsonl of about ``--size-mb`` MB into a temp dir (deterministic mixed text,
documents of 0.2-8 KB), trains a tiny GPT-2 byte-level BPE there when asked, runs the tool
(wall clock, process start included; best of ``--repeat``) for each tokenizer and worker
count, checks the outputs are byte-identical across worker counts, and prints tokens/s, MB/s,
the CPU seconds used and the speed-up ratio. The host load average is printed too: on a shared
machine, wall-clock ratios only mean something when the load is below the core count.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the of and to in is that for it as with was on be by this are from at or an "
         "model data parallel tensor pipeline gradient optimizer batch token sequence layer "
         "attention über café naïve 東京 1024 3.14 x+1 def return class import").split()


def write_corpus(path: str, size_mb: float, seed: int = 0) -> int:
    """Write the synthetic jsonl; returns its size in bytes."""
    rng = np.random.default_rng(seed)
    target, written = int(size_mb * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            n = int(rng.integers(30, 1200))
            words = np.asarray(WORDS)[rng.integers(0, len(WORDS), n)]
            line = json.dumps({"text": " ".join(words) + "."}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
    return written


def tokenizer_flags(kind: str, tmp: str) -> list[str]:
    """Command-line flags for ``kind`` (training a tiny BPE for gpt2bpe)."""
    if kind == "byte":
        return ["--tokenizer-type", "ByteTokenizer"]
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([" ".join(WORDS)] * 50, vocab_size=1000, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    vocab, merges = tok.save_model(tmp)
    return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(corpus: str, prefix: str, flags: list[str], workers: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of the tool and its workers, tokens written) of one run."""
    cpu0, t0 = _children_cpu(), time.time()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
                        "--input", corpus, "--output-prefix", prefix, "--append-eod",
                        "--workers", str(workers), "--log-interval", "1000000", *flags],
                       capture_output=True, text=True)
    seconds, cpu = time.time() - t0, _children_cpu() - cpu0
    if r.returncode:
        sys.exit(f"preprocess failed: {r.stderr}")
    return seconds, cpu, int(re.search(r"documents, (\d+) tokens", r.stdout).group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=50)
    p.add_argument("--tokenizer", nargs="+", default=["byte", "gpt2bpe"],
                   choices=["byte", "gpt2bpe"])
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeat", type=int, default=1, help="runs per setting; the best counts")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        nbytes = write_corpus(corpus, args.size_mb)
        print(f"corpus: {nbytes / 1e6:.1f} MB jsonl, {os.cpu_count()} CPU cores, "
              f"load average {os.getloadavg()[0]:.1f}")
        for kind in args.tokenizer:
            flags = tokenizer_flags(kind, tmp)
            results = {}
            for w in args.workers:
                seconds, cpu, tokens = min(run(corpus, os.path.join(tmp, f"{kind}_w{w}"), flags, w)
                                           for _ in range(args.repeat))
                results[w] = seconds
                print(f"{kind:8s} workers={w}: {seconds:6.2f} s  {tokens / seconds / 1e6:6.2f} "
                      f"M tokens/s  {nbytes / seconds / 1e6:6.2f} MB/s  cpu {cpu:6.2f} s  "
                      f"({tokens} tokens)")
            outputs = set()
            for w in args.workers:
                with open(os.path.join(tmp, f"{kind}_w{w}_text_document.bin"), "rb") as f:
                    outputs.add(hash(f.read()))
            base = args.workers[0]
            ratios = ", ".join(f"workers={w}: {results[base] / results[w]:.2f}x"
                               for w in args.workers[1:])
            print(f"{kind:8s} speed-up vs workers={base}: {ratios}; outputs identical: "
                  f"{len(outputs) == 1}")


if __name__ == "__main__":
    main()
