"""Data parallelism on CPU: step time with and without ``--overlap-grad-reduce`` at DP=2, and the
optimizer memory table (bytes per parameter) for DP = 1, 2, 4 with and without
``--use-distributed-optimizer``, for ``--bf16``.

    python benchmarks/ddp_overlap.py                   # both tables of docs/performance.md
    python benchmarks/ddp_overlap.py --skip-memory --rounds 5

**Overlap.** Two gloo processes train the same model on the same global batch (4 micro-batches
per rank), with the grads in several buckets (``--ddp-bucket-size``); with overlap each
bucket's all-reduce starts from a backward hook as soon as its grads of the last micro-batch
are in, otherwise all buckets are reduced after the backward. Both variants are launched
``--rounds`` times, alternately; the table gives medians over all timed iterations, and the
exposed data-parallel communication of each rank (the part that was
*not* hidden behind the backward: from the end of the last backward to the end of
``GradBuffer.finish_grad_sync``).

**Memory.** One bf16 training step per layout on 1, 2 or 4 processes, then
``MixedPrecisionOptimizer.memory_report()`` of rank 0: bf16 params and fp32 grads (whole model
on every rank), fp32 main params and Adam moments (whole model, or a 1/DP shard with the
distributed optimizer); Megatron's 18 and 6 + 12/DP bytes per parameter.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scaling import launch  # noqa: E402  (spawns gloo processes; puts the repository on sys.path)

MODEL = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4", "--seq-length", "128",
         "--vocab-size", "1024", "--micro-batch-size", "2", "--mock-data", "--lr", "1e-3",
         "--lr-decay-style", "constant", "--lr-warmup-iters", "0", "--eval-interval", "0"]


def _train(rank, world, argv, warmup, iters):
    """Build the Trainer, time ``iters`` steps after ``warmup``, and per step the exposed DP
    communication: from the end of the schedule (the last backward) to the end of
    ``finish_grad_sync`` (with overlap a bucket still in flight also delays the loss all-reduce
    in between, on the same process group, so it is counted from the schedule's end)."""
    from megalite.config import parse_args
    from megalite.data.build import build_datasets
    from megalite.parallel_state import ParallelState
    from megalite.training import BatchIterator, Trainer

    cfg = parse_args(argv + ["--train-iters", str(warmup + iters)], world_size=world)
    pstate = ParallelState.from_sizes()
    (train_ds, _, _), vocab = build_datasets(cfg, log=lambda msg: None)
    trainer = Trainer(cfg, pstate, vocab, log=lambda msg: None)
    batches = BatchIterator(train_ds, cfg, pstate)
    data = [batches.next_microbatches(cfg.num_microbatches) for _ in range(warmup + iters)]
    waits, schedule_end = [], [0.0]
    schedule, finish = trainer.schedule, trainer.buffer.finish_grad_sync

    def timed_schedule(*args, **kwargs):
        losses = schedule(*args, **kwargs)
        schedule_end[0] = time.perf_counter()
        return losses

    def timed_finish():
        finish()
        waits.append(time.perf_counter() - schedule_end[0])
    trainer.schedule, trainer.buffer.finish_grad_sync = timed_schedule, timed_finish
    steps = []
    for microbatches in data:
        start = time.perf_counter()
        trainer.train_step(microbatches)
        steps.append(time.perf_counter() - start)
    return {"steps": steps[warmup:], "waits": waits[warmup:], "buckets": len(trainer.buffer.buckets),
            "numel": trainer.buffer.numel}


def overlap_table(rounds: int, warmup: int, iters: int, bucket_size: int, threads: int) -> None:
    argv = MODEL + ["--global-batch-size", "16", "--ddp-bucket-size", str(bucket_size)]
    variants = {"off": argv, "on": argv + ["--overlap-grad-reduce"]}
    results = {name: [] for name in variants}
    for r in range(rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            results[name].append(launch(_train, 2, variants[name], warmup, iters, threads=threads))
    first = results["off"][0][0]
    print(f"\nDP=2 on 2 gloo processes ({threads} torch thread each); model {' '.join(MODEL[:10])}, "
          f"{first['numel']:,} grad elements in {first['buckets']} buckets (--ddp-bucket-size {bucket_size}); "
          f"global batch 16 = 4 micro-batches of 2 per rank; fp32; {rounds} launches x {iters} timed iterations; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| --overlap-grad-reduce | step (ms), median | min | exposed DP comm (ms), rank 0 / rank 1 |")
    print("|---|---|---|---|")
    medians = {}
    for name, launches in results.items():
        steps = [max(pair) for run in launches for pair in zip(run[0]["steps"], run[1]["steps"])]
        waits = [statistics.median(w for run in launches for w in run[rank]["waits"]) for rank in (0, 1)]
        medians[name] = statistics.median(steps)
        print(f"| {name} | {1e3 * medians[name]:.1f} | {1e3 * min(steps):.1f} | "
              f"{1e3 * waits[0]:.1f} / {1e3 * waits[1]:.1f} |")
    print(f"\nstep time with / without overlap: {medians['on'] / medians['off']:.3f}")


def _memory(rank, world, argv):
    from megalite.config import parse_args
    from megalite.data.build import build_datasets
    from megalite.parallel_state import ParallelState
    from megalite.training import BatchIterator, Trainer

    cfg = parse_args(argv, world_size=world)
    pstate = ParallelState.from_sizes()
    (train_ds, _, _), vocab = build_datasets(cfg, log=lambda msg: None)
    trainer = Trainer(cfg, pstate, vocab, log=lambda msg: None)
    trainer.train_step(BatchIterator(train_ds, cfg, pstate).next_microbatches(cfg.num_microbatches))
    report = trainer.optimizer.memory_report()  # after a step: Adam's state is allocated
    return {"report": report, "numel": sum(p.numel() for p in trainer.buffer.params)}


def memory_table(worlds: list[int]) -> None:
    print("\nbf16, one training step, rank 0's MixedPrecisionOptimizer.memory_report() (bytes per parameter "
          "of the model; padding of the buckets to a multiple of DP included)\n")
    print("| DP | --use-distributed-optimizer | params (bf16) | grads (fp32) | main params (fp32) | Adam state "
          "| total B/param | Megatron's formula | total MiB (rank 0) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for world in worlds:
        for distributed in (False, True):
            argv = MODEL + ["--bf16", "--global-batch-size", str(2 * world), "--train-iters", "1"]
            argv += ["--use-distributed-optimizer"] if distributed else []
            res = launch(_memory, world, argv, threads=1)[0]
            per = res["report"]["per_param"]
            total = sum(per[k] for k in ("params", "grads", "main_params", "optimizer_state"))
            formula = f"6 + 12/{world} = {6 + 12 / world:g}" if distributed else "18"
            mib = sum(res["report"][k] for k in ("params", "grads", "main_params", "optimizer_state")) / 2 ** 20
            print(f"| {world} | {'yes' if distributed else 'no'} | {per['params']:.2f} | {per['grads']:.2f} | "
                  f"{per['main_params']:.2f} | {per['optimizer_state']:.2f} | {total:.2f} | {formula} | {mib:.1f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="launches of each overlap variant (default 4)")
    parser.add_argument("--iters", type=int, default=4, help="timed iterations per launch")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per launch")
    parser.add_argument("--bucket-size", type=int, default=500_000, help="--ddp-bucket-size (elements)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="DP sizes of the memory table")
    parser.add_argument("--skip-overlap", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_overlap:
        overlap_table(args.rounds, args.warmup, args.iters, args.bucket_size, args.threads)
    if not args.skip_memory:
        memory_table(args.worlds)


if __name__ == "__main__":
    main()
