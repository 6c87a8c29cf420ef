"""Step time with packed-document masking vs without, on the same data (CPU, one process).

    python benchmarks/packed_documents.py                    # the tables of docs/performance.md
    python benchmarks/packed_documents.py --configs s512 --mean-doc-length 64 --reps 3

Writes a ``.bin/.idx`` of random documents (lengths drawn from a geometric distribution with the
given mean, each ended by the EOD of ``NullTokenizer``) and trains the same model from the same
initial weights, on the same samples, three ways:

* ``causal``: no flag (tokens attend across document boundaries);
* ``positions + loss mask``: ``--reset-position-ids --eod-mask-loss`` (per-sample positions, no
  attention mask);
* ``document mask``: all three flags; with ``--reset-attention-mask`` the CPU path runs SDPA on
  chunks of queries against the keys their documents reach, with the additive mask of each
  block (built once per micro-batch), instead of ``is_causal``.

Timing is step_time.py's: ``Trainer.train_step`` on pre-built micro-batches (data loading
excluded), interleaved rounds (A B C, C B A, ...), medians. A second table isolates one layer's
core attention, forward + backward: ``is_causal``, the packed-document path, and one SDPA call
with the whole ``[b, 1, s, s]`` mask.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from step_time import time_runners  # noqa: E402

from megalite.config import parse_args  # noqa: E402
from megalite.data.build import build_datasets  # noqa: E402
from megalite.data.indexed_dataset import IndexedDatasetBuilder, optimal_dtype  # noqa: E402
from megalite.model.core_attention import sdpa_attention  # noqa: E402
from megalite.model.document_mask import DocumentMask  # noqa: E402
from megalite.parallel_state import ParallelState  # noqa: E402
from megalite.training import BatchIterator, Trainer  # noqa: E402

CONFIGS = {
    "s512": dict(num_layers=4, hidden_size=256, num_attention_heads=4, seq_length=512, micro_batch_size=8),
    "s2048": dict(num_layers=4, hidden_size=256, num_attention_heads=4, seq_length=2048, micro_batch_size=2),
    "tiny": dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32, micro_batch_size=2),
}
VOCAB = 8192  # NullTokenizer --vocab-size 8191: ids 0..8190 and the EOD 8191
VARIANTS = {"causal": (), "positions + loss mask": ("--reset-position-ids", "--eod-mask-loss"),
            "document mask": ("--reset-position-ids", "--eod-mask-loss", "--reset-attention-mask")}


def write_corpus(prefix: str, tokens: int, mean_doc_length: int, seed: int = 0) -> int:
    """Random documents of geometric lengths (mean ``mean_doc_length``, EOD included); returns how many."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=optimal_dtype(VOCAB))
    written = docs = 0
    while written < tokens:
        n = int(rng.geometric(1.0 / mean_doc_length))
        doc = np.append(rng.integers(0, VOCAB - 1, n - 1), VOCAB - 1) if n > 1 else np.array([VOCAB - 1])
        builder.add_document(doc, [doc.size])
        written, docs = written + doc.size, docs + 1
    builder.finalize(prefix + ".idx")
    return docs


def argv_for(c: dict, prefix: str, microbatches: int, iters: int, flags: tuple) -> list[str]:
    """The pretrain_gpt.py flags of config ``c`` on the corpus at ``prefix``, plus a variant's ``flags``."""
    return ["--num-layers", str(c["num_layers"]), "--hidden-size", str(c["hidden_size"]),
            "--num-attention-heads", str(c["num_attention_heads"]), "--seq-length", str(c["seq_length"]),
            "--micro-batch-size", str(c["micro_batch_size"]),
            "--global-batch-size", str(c["micro_batch_size"] * microbatches), "--train-iters", str(iters),
            "--lr", "1e-3", "--lr-decay-style", "constant", "--eval-interval", "0", "--data-path", prefix,
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB - 1), "--split", "100,0,0",
            "--data-cache-path", os.path.join(os.path.dirname(prefix), "cache"), *flags]


class Runner:
    """One variant: a Trainer (same seed, so the same initial weights) and its micro-batches of
    the same samples (the variants differ only in the fields the flags add)."""

    def __init__(self, name: str, argv: list[str]):
        self.name = name
        cfg = parse_args(argv)
        (train, _, _), vocab = build_datasets(cfg, log=lambda m: None)
        self.trainer = Trainer(cfg, ParallelState.from_sizes(), vocab, log=lambda m: None)
        self.batches = BatchIterator(train, cfg, ParallelState.from_sizes()).next_microbatches(cfg.num_microbatches)

    def step(self, _batches) -> float:
        """One timed iteration on this variant's own micro-batches (``time_runners``' batches unused)."""
        return self.trainer.train_step(self.batches)["loss"]


def attention_times(c: dict, document_ids: torch.Tensor, reps: int) -> dict[str, float]:
    """Median seconds of one layer's core attention, forward + backward, at the config's shapes:
    plain causal, megalite's packed-document path (SDPA on query chunks) and one SDPA call with
    the whole additive mask (what CUDA without a varlen kernel, and CP, use)."""
    b, s = document_ids.shape
    heads, d = c["num_attention_heads"], c["hidden_size"] // c["num_attention_heads"]
    q, k, v = (torch.randn(s, b, heads, d, requires_grad=True) for _ in range(3))
    mask = DocumentMask(document_ids)

    def whole_mask():
        out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)),
                                             attn_mask=mask.additive(q.dtype))
        return out.permute(2, 0, 1, 3)
    runs = {"is_causal": lambda: sdpa_attention(q, k, v, 0.0, None),
            "document mask (chunked)": lambda: sdpa_attention(q, k, v, 0.0, None, mask),
            "whole mask": whole_mask}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(reps + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run().sum().backward()
            if rep:  # the first round warms up (and builds the cached masks)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run_config(name: str, args) -> None:
    """Write a corpus, time the three variants and the attention kernels of config ``name``; print the tables."""
    c = CONFIGS[name]
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "docs_text_document")
        need = c["seq_length"] * c["micro_batch_size"] * args.microbatches * (args.train_iters + 1) + 1
        docs = write_corpus(prefix, int(need * 1.2), args.mean_doc_length)
        runners = [Runner(variant, argv_for(c, prefix, args.microbatches, args.train_iters, flags))
                   for variant, flags in VARIANTS.items()]
        batch = runners[-1].batches[0]
        per_sample = batch["document_ids"].max(dim=1).values - batch["document_ids"].min(dim=1).values + 1
        print(f"\n## {name}: L={c['num_layers']} h={c['hidden_size']} a={c['num_attention_heads']} "
              f"s={c['seq_length']} mb={c['micro_batch_size']} x {args.microbatches} V={VOCAB}, fp32, "
              f"{torch.get_num_threads()} threads; {docs} documents of mean length {args.mean_doc_length}: "
              f"{per_sample.float().mean():.1f} documents per sample")
        times = time_runners(runners, [], args.reps, args.iters, args.warmup)
        attention = attention_times(c, batch["document_ids"], args.reps * args.iters)
    medians = {k: statistics.median(v) for k, v in times.items()}
    ref = medians["causal"]
    print("| variant | median ms/iter | min | max | n | ratio to causal |\n|---|---|---|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {1e3 * medians[k]:.1f} | {1e3 * min(v):.1f} | {1e3 * max(v):.1f} | {len(v)} "
              f"| {medians[k] / ref:.3f} |")
    print("\none layer's core attention, forward + backward:")
    print("| attention | median ms | ratio to is_causal |\n|---|---|---|")
    for k, t in attention.items():
        print(f"| {k} | {1e3 * t:.2f} | {t / attention['is_causal']:.3f} |")


def main(argv=None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["s512", "s2048"], choices=sorted(CONFIGS))
    parser.add_argument("--mean-doc-length", type=int, default=128, help="mean document length in tokens")
    parser.add_argument("--reps", type=int, default=4, help="interleaved rounds (default 4)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per variant and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations before each round's timing")
    parser.add_argument("--microbatches", type=int, default=1, help="micro-batches per iteration")
    parser.add_argument("--train-iters", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    for name in args.configs:
        run_config(name, args)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
