#!/usr/bin/env python
"""Build the dataset index caches ahead of training, on CPU, from the training flags.

    python tools/build_data_cache.py --data-path 0.7 a_text_document 0.3 b_text_document \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \\
        --split 969,30,1 --seq-length 1024 --train-iters 10000 --global-batch-size 64 \\
        --data-cache-path cache/

takes ``pretrain_gpt.py``'s flags (its parser, with its defaults: pass the same command line)
and builds what training would, with the same function (``megalite.data.build.build_datasets``):
the document, sample, shuffle and blending indices in ``--data-cache-path``, so the training
job only loads them. ``--world-size N`` (default 1) only matters without
``--global-batch-size`` (default micro batch x data-parallel size). Imports no torch.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

# Run from a checkout: use this checkout's megalite (even if another one is installed).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "megalite")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from megalite.config import SECTIONS, Config, build_parser
from megalite.data.build import build_datasets
from megalite.data.gpt_dataset import train_valid_test_num_samples


def parse_training_flags(argv=None) -> Config:
    """The training flags as ``pretrain_gpt.py`` reads them (defaults included), without the
    model checks (which import torch): the data settings are all that matter here."""
    parser = build_parser()
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--world-size", type=int, default=1,
                        help="training processes (only for the default --global-batch-size)")
    values = vars(parser.parse_args(argv))
    cfg = Config(world_size=values["world_size"], **{
        section: cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})
        for section, cls in SECTIONS.items()})
    t = cfg.training
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * cfg.data_parallel_size
    if cfg.data.data_path and not cfg.data.tokenizer_type:
        parser.exit(2, "error: --data-path needs --tokenizer-type (and its files) to know the vocabulary\n")
    return cfg


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    cfg = parse_training_flags(argv)
    t, lg = cfg.training, cfg.logging
    num_samples = train_valid_test_num_samples(t.train_iters, t.global_batch_size, lg.eval_interval,
                                               lg.eval_iters)
    print(f"target samples: train {num_samples[0]}, valid {num_samples[1]}, "
          f"test {num_samples[2]}")
    t0 = time.time()
    try:
        datasets, _ = build_datasets(cfg, log=print)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{name} {'-' if d is None else len(d)}"
                      for name, d in zip(("train", "valid", "test"), datasets))
    print(f"dataset sizes: {sizes}; done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
