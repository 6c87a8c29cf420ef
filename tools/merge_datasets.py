#!/usr/bin/env python
"""Merge several ``.bin/.idx`` datasets into one (Megatron's merge_datasets.py).

    python tools/merge_datasets.py --input shards/ --output-prefix merged_text_document
    python tools/merge_datasets.py --input a_text_document b_text_document --output-prefix ab

``--input`` is a directory (every ``*.idx`` prefix in it, sorted by name) or a list of
prefixes (merged in the order given). Memory stays bounded for thousands of inputs: the index
arrays are streamed one input at a time and ``.bin`` bytes copied in chunks. All inputs must
share a token dtype. The output appears only when complete (temporary names, then rename).
"""
from __future__ import annotations

import argparse
import os
import sys

# Run from a checkout: use this checkout's megalite (even if another one is installed).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "megalite")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from megalite.data.indexed_dataset import (IndexedDatasetError, bin_path, idx_path,
                                           merge_indexed_datasets, read_index_header)


def input_prefixes(inputs: list[str]) -> list[str]:
    """Expand ``--input``: a single directory gives its sorted ``*.idx`` prefixes."""
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        d = inputs[0]
        prefixes = sorted(os.path.join(d, f[:-4]) for f in os.listdir(d) if f.endswith(".idx"))
        if not prefixes:
            raise FileNotFoundError(f"--input: no .idx files in directory {d}")
        return prefixes
    return [p[:-4] if p.endswith((".idx", ".bin")) else p for p in inputs]


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help="a directory of .bin/.idx pairs, or a list of prefixes")
    p.add_argument("--output-prefix", required=True, help="output path without suffix")
    args = p.parse_args(argv)
    try:
        prefixes = input_prefixes(args.input)
        out = os.path.abspath(args.output_prefix)
        if any(os.path.abspath(x) == out for x in prefixes):
            raise ValueError(f"--output-prefix {args.output_prefix} is also an input")
        merge_indexed_datasets(prefixes, args.output_prefix, log=print)
        # The summary from the header and file size: reopening the output as an IndexedDataset
        # would read its whole index (memory growing with the merged size).
        dtype, sequences, doc_count = read_index_header(idx_path(args.output_prefix))
    except (ValueError, FileNotFoundError, IndexedDatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tokens = os.path.getsize(bin_path(args.output_prefix)) // dtype.itemsize
    print(f"merged {len(prefixes)} datasets into {args.output_prefix}.bin/.idx: "
          f"{doc_count - 1} documents, {sequences} sequences, {tokens} tokens ({dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
