"""Checkpoint save / load time, peak extra memory and bytes written per rank, vs DP and model size.

For each model size and DP in (1, 2, 4) (fp32, distributed optimizer, one process per rank on
gloo), in one run, side by side:

* ``sharded``: megalite's format (each rank writes its distributed-optimizer share);
* ``format 1``: the format megalite wrote before (re-implemented here as it was: every rank
  builds full-size flat buffers of main params and both Adam moments, all-reduces them over DP,
  and DP rank 0 writes everything);
* ``async``: ``--async-save``: the time the training loop is blocked by a save (the copy of
  the rank's share) against the synchronous save's time.

Peak extra memory is the rank's resident set size sampled every millisecond during the save,
minus the one before it. Targets (issue 19): extra memory at save <= 16 bytes/param / DP + one
staging buffer; bytes written per rank ~ 1/DP of the state; async hides >= 80 % of the save.

    python benchmarks/checkpoint.py                 # sizes small, medium; DP 1, 2, 4
    python benchmarks/checkpoint.py --sizes small --dp 1 2
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from scaling import launch  # noqa: E402  (spawn + read results before joining)

SIZES = {"small": ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4"],
         "medium": ["--num-layers", "8", "--hidden-size", "512", "--num-attention-heads", "8"]}
COMMON = ["--seq-length", "64", "--micro-batch-size", "1", "--mock-data", "--vocab-size", "8192", "--train-iters", "100",
          "--use-distributed-optimizer", "--eval-interval", "0"]


class PeakRSS:
    """The largest resident set size (bytes) seen while the block runs, sampled every ms."""

    def __enter__(self):
        self.before = self.peak = _rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.before


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def format_1_save(trainer, root: str) -> None:
    """How megalite saved before the sharded format (model and optimizer part; RNG and common
    files left out): full flat buffers, all-reduced over DP, written by DP rank 0."""
    from megalite.model import named_global_parameters
    params = dict(named_global_parameters(trainer.model))
    total = sum(p.numel() for p in params.values())
    flat = {k: torch.zeros(total) for k in ("exp_avg", "exp_avg_sq", "main")}
    offsets, offset = {}, 0
    for name, p in params.items():
        offsets[name], offset = offset, offset + p.numel()
    for name, piece in trainer.optimizer.state_dict()["fragments"].items():
        for key in flat:
            if key in piece:
                flat[key][offsets[name] + piece["start"]:offsets[name] + piece["end"]] = piece[key].reshape(-1)
    if trainer.pstate.dp_cp_size > 1:
        for tensor in flat.values():
            dist.all_reduce(tensor, group=trainer.pstate.dp_cp_group)
    if trainer.pstate.dp_cp_rank == 0:
        os.makedirs(root, exist_ok=True)
        torch.save({name: {"tensor": p.detach(), **{k: flat[k][offsets[name]:offsets[name] + p.numel()].view_as(p)
                                                     for k in flat}} for name, p in params.items()},
                   os.path.join(root, f"model_tp00_pp{trainer.pstate.pp_rank:02d}.pt"))
    _barrier()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _bytes_in(directory: str, prefix: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.startswith(prefix))


def _measure(rank, world, argv, workdir):
    from megalite.checkpointing import Checkpointer, load_checkpoint
    from megalite.config import parse_args
    from megalite.data.build import build_datasets
    from megalite.parallel_state import ParallelState
    from megalite.training import BatchIterator, Trainer

    cfg = parse_args(argv, world_size=world)
    ps = ParallelState.from_config(cfg)
    (train_ds, _, _), vocab = build_datasets(cfg, log=lambda m: None)
    trainer = Trainer(cfg, ps, vocab, log=lambda m: None)
    batches = BatchIterator(train_ds, cfg, ps)
    step = lambda: trainer.train_step(batches.next_microbatches(cfg.num_microbatches))  # noqa: E731
    step()  # Adam state exists
    out = {"params": sum(p.numel() for c in trainer.model for p in c.parameters())}
    root = os.path.join(workdir, "sharded")
    _barrier()
    with PeakRSS() as mem:
        start = time.perf_counter()
        Checkpointer(root, log=lambda m: None).save(trainer)
        out["save_s"], out["save_extra"] = time.perf_counter() - start, mem.extra
    directory = os.path.join(root, f"iter_{trainer.iteration:07d}")
    out["save_bytes"] = os.path.getsize(os.path.join(directory, f"shard_{rank:05d}.pt"))
    _barrier()
    with PeakRSS() as mem:
        start = time.perf_counter()
        format_1_save(trainer, os.path.join(workdir, "format1"))
        out["old_s"], out["old_extra"] = time.perf_counter() - start, mem.extra
    out["old_bytes"] = _bytes_in(os.path.join(workdir, "format1"), "model_") if ps.dp_cp_rank == 0 else 0
    _barrier()
    with PeakRSS() as mem:
        start = time.perf_counter()
        load_checkpoint(trainer, root, log=lambda m: None)
        out["load_s"], out["load_extra"] = time.perf_counter() - start, mem.extra
    out.update(_async_blocking(trainer, step, os.path.join(workdir, "async")))
    return out


def _async_blocking(trainer, step, root: str) -> dict:
    """Seconds the loop is blocked by an async save (save() + polls until committed) vs a sync one."""
    from megalite.checkpointing import Checkpointer

    step()
    timings = {}
    for mode in ("sync", "async"):
        checkpointer = Checkpointer(os.path.join(root, mode), async_save=mode == "async", log=lambda m: None)
        _barrier()
        blocked = time.perf_counter()
        checkpointer.save(trainer)
        blocked = time.perf_counter() - blocked
        while checkpointer.pending is not None:  # the training loop: a step, then a poll
            step()
            start = time.perf_counter()
            checkpointer.poll()
            blocked += time.perf_counter() - start
        timings[f"{mode}_blocked_s"] = blocked
    return timings


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--dp", nargs="+", type=int, default=[1, 2, 4])
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.1f}; fp32, distributed optimizer; per rank, max over ranks")
    print(" size   | DP | params | save s (sharded / format 1) | extra MB at save (sharded / format 1 / bound) "
          "| MB written per rank (sharded / format 1) | load s | async blocked / sync s (hidden)")
    for size in args.sizes:
        for dp in args.dp:
            workdir = tempfile.mkdtemp(prefix="megalite-ckpt-bench-")
            try:
                results = launch(_measure, dp, SIZES[size] + COMMON + ["--global-batch-size", str(dp)], workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            r = {k: max(x[k] for x in results) for k in results[0]}
            bound = 16 * r["params"] / dp / 2**20
            hidden = 1 - r["async_blocked_s"] / r["sync_blocked_s"]
            print(f" {size:6} | {dp:2d} | {r['params'] / 1e6:5.1f}M | {r['save_s']:6.2f} / {r['old_s']:6.2f}"
                  f"               | {r['save_extra'] / 2**20:7.1f} / {r['old_extra'] / 2**20:7.1f} / {bound:7.1f}"
                  f"                 | {r['save_bytes'] / 2**20:7.1f} / {r['old_bytes'] / 2**20:7.1f}"
                  f"                        | {r['load_s']:5.2f} | {r['async_blocked_s']:.3f} / "
                  f"{r['sync_blocked_s']:.3f} ({hidden:.0%})", flush=True)


if __name__ == "__main__":
    main()
