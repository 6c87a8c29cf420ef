#!/usr/bin/env python
"""Build the dataset index caches ahead of training, on CPU, from the training flags.

    python tools/build_data_cache.py --data-path 0.7 a_text_document 0.3 b_text_document \\
        --split 969,30,1 --seq-length 1024 --seed 1234 --train-iters 10000 \\
        --global-batch-size 64 --eval-interval 1000 --eval-iters 10 --data-cache-path cache/

computes the train / valid / test sample counts exactly as training does
(``megalite.data.gpt_dataset.train_valid_test_num_samples``) and builds the document, sample,
shuffle and blending indices into ``--data-cache-path``, so the training job only loads them.
Pass the same values as to ``pretrain_gpt.py``; any difference builds a different cache.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# Run from a checkout: use this checkout's megalite (even if another one is installed).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "megalite")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from megalite.data.gpt_dataset import (build_train_valid_test_datasets,
                                       train_valid_test_num_samples)


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", nargs="+", default=None,
                   help="prefix, or weight prefix pairs (default: the built-in corpus)")
    p.add_argument("--split", default="969,30,1")
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--train-iters", type=int, required=True)
    p.add_argument("--global-batch-size", type=int, required=True)
    p.add_argument("--eval-interval", type=int, default=1000)
    p.add_argument("--eval-iters", type=int, default=100)
    p.add_argument("--data-cache-path", default=None,
                   help="index cache directory (default: beside each dataset, as Megatron)")
    args = p.parse_args(argv)
    num_samples = train_valid_test_num_samples(args.train_iters, args.global_batch_size,
                                               args.eval_interval, args.eval_iters)
    print(f"target samples: train {num_samples[0]}, valid {num_samples[1]}, "
          f"test {num_samples[2]}")
    t0 = time.time()
    try:
        datasets = build_train_valid_test_datasets(
            args.data_path, args.split, args.seq_length, args.seed, num_samples,
            args.data_cache_path)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{name} {'-' if d is None else len(d)}"
                      for name, d in zip(("train", "valid", "test"), datasets))
    print(f"dataset sizes: {sizes}; done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
