"""Measured pipeline bubble of 1F1B and ZB-H1 side by side, on CPU processes with gloo.

    python benchmarks/pipeline_bubble.py                     # PP=2, m=8; the table of docs/performance.md
    python benchmarks/pipeline_bubble.py --rounds 1 --iters 2 --microbatches 4

Both schedules train the same model (benchmarks/scaling.py's: 8 layers, h 256, s 256, fp32, mock
data) on ``--pp`` processes with ``--microbatches`` micro-batches of 2 per iteration. The
launches alternate (1f1b, zb-h1, then the other order in the next round) and the numbers are
medians over all timed iterations of all rounds, so load from other processes hits both alike.

Per schedule: the step time, the mean length of a forward (F), a backward (B: the whole backward
under 1F1B, the input grads under ZB-H1) and a W (ZB-H1's weight grads), and the bubble as
tools/plot_timeline.py measures it (the part of the iteration's pipeline span in which a rank
computes nothing, p2p waits included) next to the theory: ``(p-1)/(m+p-1)`` for 1F1B,
``(p-1)(F+B-W) / (m(F+B+W) + (p-1)(F+B-W))`` with the measured F, B, W for ZB-H1; and the same
as idle time per rank (bubble x span, mean over the ranks) next to ``(p-1)(F+B)`` (1F1B, B the
whole backward) and ``(p-1)(F+B-W)`` (ZB-H1), which does not depend on how long the work is.

Then, on this process (1 thread, the model's first 4 layers, one micro-batch), the cost of the
split itself: a plain backward against B + W, ``--split-reps`` interleaved repetitions.

CPU only: this measures gloo processes sharing the machine's cores, not GPUs. With more
processes than cores (``--pp 4`` on 2 cores) every rank is idle half of the time whatever the
schedule; read ``--pp 2`` there.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scaling  # noqa: E402  (launch, _train, MODEL, TRAINING; puts tools/ on the path)
from scaling import plot_timeline  # noqa: E402

SCHEDULES = ("1f1b", "zb-h1")


def run(schedule: str, pp: int, m: int, warmup: int, iters: int, path: str) -> list[dict]:
    """One launch: per timed iteration, the step time, mean F/B/W, and each rank's bubble."""
    flags = ["--pipeline-model-parallel-size", str(pp), "--pipeline-schedule", schedule,
             "--global-batch-size", str(2 * m)]
    results = scaling.launch(scaling._train, pp, scaling.MODEL + scaling.TRAINING + flags, warmup, iters, path,
                             threads=1)
    ranks = plot_timeline.load(path)
    rows = []
    for i in range(-iters, 0):
        selected = plot_timeline.select_iteration(ranks, i)
        t0, t1, stats = plot_timeline.bubble_fractions(selected)
        durations = plot_timeline.mean_durations(selected)
        step = max(r["steps"][i][1] - r["steps"][i][0] for r in results)
        rows.append({"step": step, **durations, "bubbles": [s["bubble"] for s in stats],
                     "idle": sum(s["bubble"] for s in stats) * (t1 - t0) / len(stats)})
    return rows


def theory(schedule: str, pp: int, m: int, f: float, b: float, w: float | None) -> tuple[float, float]:
    """(bubble fraction, idle time per rank) for equal stages and free communication."""
    if schedule == "zb-h1":
        return plot_timeline.theory_zero_bubble(pp, m, f, b, w), (pp - 1) * max(f + b - w, 0.0)
    return plot_timeline.theory(pp, m), (pp - 1) * (f + b)


def report(rows: dict[str, list[dict]], pp: int, m: int) -> None:
    print(f"\n| schedule | p | m | step (ms) | F / B / W (ms) | bubble per rank (measured) | mean | theory "
          "| idle per rank, ms (measured / theory) |\n|---|---|---|---|---|---|---|---|---|")
    for schedule, mine in rows.items():
        med = {k: statistics.median(r[k] for r in mine) for k in ("step", "forward", "backward", "idle")}
        w = statistics.median(r["weight"] for r in mine) if "weight" in mine[0] else None
        bubbles = [statistics.median(r["bubbles"][k] for r in mine) for k in range(pp)]
        fbw = f"{1e3 * med['forward']:.1f} / {1e3 * med['backward']:.1f} / " + (f"{1e3 * w:.1f}" if w else "-")
        fraction, idle = theory(schedule, pp, m, med["forward"], med["backward"], w)
        print(f"| {schedule} | {pp} | {m} | {1e3 * med['step']:.0f} | {fbw} | "
              f"{' / '.join(f'{b:.3f}' for b in bubbles)} | {sum(bubbles) / pp:.3f} | {fraction:.3f} | "
              f"{1e3 * med['idle']:.0f} / {1e3 * idle:.0f} |")


def split_cost(reps: int) -> None:
    """Median ms of a plain backward and of B and W on one process (same model, same batch)."""
    import torch

    from megalite.config import parse_args
    from megalite.model import GPTModel
    from megalite.parallel_state import ParallelState
    from megalite.tensor_parallel.weight_grad import WeightGradStore

    torch.set_num_threads(1)
    cfg = parse_args(scaling.MODEL[:-4] + ["--num-layers", "4", "--mock-data"])
    model = GPTModel(cfg.model, ParallelState.from_sizes(), vocab_size=cfg.data.vocab_size)
    tokens, labels = (torch.randint(0, cfg.data.vocab_size, (2, cfg.model.seq_length)) for _ in range(2))
    times: dict[str, list[float]] = {"plain backward": [], "B": [], "W": [], "B + W": []}
    for rep in range(reps):
        for split in ((False, True) if rep % 2 == 0 else (True, False)):
            store = WeightGradStore()
            with store.attached([model]) if split else contextlib.nullcontext():
                loss = model(tokens, labels=labels).sum()
                start = time.perf_counter()
                with store.capture(0) if split else contextlib.nullcontext():
                    loss.backward()
                middle = time.perf_counter()
                if split:
                    store.run(0)
                end = time.perf_counter()
            model.zero_grad(set_to_none=True)
            if split:
                times["B"].append(middle - start), times["W"].append(end - middle), times["B + W"].append(end - start)
            else:
                times["plain backward"].append(end - start)
    print(f"\nsplit cost, 1 process, 1 thread, 4 layers, {reps} interleaved repetitions (median ms): "
          + ", ".join(f"{k} {1e3 * statistics.median(v):.1f}" for k, v in times.items()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, default=2, help="pipeline stages = processes (default 2)")
    parser.add_argument("--microbatches", "-m", type=int, default=8, help="micro-batches per iteration (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="launches of each schedule (default 3)")
    parser.add_argument("--iters", type=int, default=4, help="timed iterations per launch")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per launch")
    parser.add_argument("--split-reps", type=int, default=20, help="repetitions of the split-cost measurement (0: skip)")
    args = parser.parse_args(argv)
    rows: dict[str, list[dict]] = {s: [] for s in SCHEDULES}
    start_load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as workdir:
        for r in range(args.rounds):
            for schedule in (SCHEDULES if r % 2 == 0 else SCHEDULES[::-1]):
                path = os.path.join(workdir, f"{schedule}_round{r}")
                rows[schedule] += run(schedule, args.pp, args.microbatches, args.warmup, args.iters, path)
    print(f"model: {' '.join(scaling.MODEL[:-4])}; micro-batches of 2; fp32; 1 torch thread per process; "
          f"CPU (gloo), {os.cpu_count()} CPUs visible; load average {start_load:.1f} -> {os.getloadavg()[0]:.1f}")
    report(rows, args.pp, args.microbatches)
    if args.split_reps:
        split_cost(args.split_reps)


if __name__ == "__main__":
    main()
