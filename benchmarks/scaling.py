"""CPU scaling: step time of TP=2, PP=2 and DP=2 (two gloo processes each) next to one process,
with each rank's time split into compute, communication and pipeline bubble.

    python benchmarks/scaling.py                        # the tables of docs/performance.md
    python benchmarks/scaling.py --rounds 3 --iters 4 --layouts serial pp2
    python benchmarks/scaling.py --rounds 2 --layouts serial tp2pp2dp2   # 3D: TP=2 x PP=2 x DP=2, 8 processes

Every layout trains the same model on the same global batch (16 sequences by default: 8
micro-batches of 2; DP=2 gives each rank 4 of them), fp32, mock data, constant learning rate.
The processes are launched ``--rounds`` times, the layouts in turn (the order flips between
rounds), and the numbers are the medians over all timed iterations of all rounds, so a burst
of load from other processes on a shared machine is spread over the layouts. One process gets
``--threads`` (2) torch threads; each of the two processes of a parallel layout gets half.

Where the time goes, per rank and per iteration:

* **compute**: forward and backward spans of the pipeline schedule (``--timeline-file``
  events), minus the tensor-parallel collectives that run inside them;
* **TP / DP / other comm**: time inside ``torch.distributed`` collectives, by process group
  (timed by wrapping the collectives in the worker): TP all-reduces of activations and their
  grads; the data-parallel grad all-reduce and the token/loss sums; grad-norm and
  tied-embedding reductions;
* **p2p**: the pipeline's send/recv calls (the timeline's ``comm`` events), mostly waiting for
  the neighbour stage on CPU;
* **bubble**: as tools/plot_timeline.py measures it (its functions are reused): the fraction
  of the iteration's pipeline span in which the rank runs neither a forward nor a backward
  (p2p waits included), next to the theory ``(p - 1) / (m + p - 1)``;
* **rest**: the step time minus all of the above (optimizer step, Python, waits outside p2p).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import os
import queue as queue_module
import socket
import statistics
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import plot_timeline  # noqa: E402  (tools/plot_timeline.py: load, select_iteration, bubble_fractions, theory)

# 8 layers and a small vocabulary, so that the two pipeline stages cost about the same (the last
# one also runs the output layer and the loss: ~7 % more here).
MODEL = ["--num-layers", "8", "--hidden-size", "256", "--num-attention-heads", "4", "--seq-length", "256",
         "--vocab-size", "1024", "--micro-batch-size", "2", "--global-batch-size", "16"]
TRAINING = ["--mock-data", "--lr", "1e-3", "--lr-decay-style", "constant", "--lr-warmup-iters", "0",
            "--eval-interval", "0", "--clip-grad", "1.0"]
LAYOUTS = {  # name -> (processes, flags)
    "serial": (1, []),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "dp2": (2, []),
    # All three at once on 8 processes (4 per core on a 2-core machine: oversubscribed, so read
    # its split, not its step time). Micro-batches of 1 keep the global batch and m = 8 per pipeline.
    "tp2pp2dp2": (8, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                      "--micro-batch-size", "1"]),
}
DEFAULT_LAYOUTS = ["serial", "tp2", "pp2", "dp2"]
COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "broadcast",
               "barrier")


# -- launching ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world, port, threads, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        if world > 1:
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
        queue.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:  # noqa: BLE001 - report to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn, world: int, *args, threads: int = 1) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned processes (gloo when world > 1, with
    ``threads`` torch threads each); return the results by rank.

    The results are read *before* joining: a rank's result (thousands of collective events)
    can exceed the pipe's buffer, and a rank blocked writing it would never exit."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.start_processes(_worker, args=(world, _free_port(), threads, fn, args, queue), nprocs=world,
                               join=False, start_method="spawn")
    results = {}
    try:
        while len(results) < world:
            try:
                rank, status, payload = queue.get(timeout=5.0)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs.processes) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    raise RuntimeError(f"rank(s) {dead} died without a result (exit codes "
                                       f"{[procs.processes[r].exitcode for r in dead]})") from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
    except BaseException:
        for p in procs.processes:  # the others may wait in a collective for the failed rank
            if p.is_alive():
                p.terminate()
        raise
    while not procs.join():
        pass
    return [results[r] for r in range(world)]


# -- timing collectives -------------------------------------------------------------------
class CollectiveTimer:
    """Wraps ``torch.distributed`` collectives (and the aliases megalite's modules hold) to
    record ``(group name, start, end)`` of every call, naming groups after ``pstate``'s."""

    def __init__(self, pstate):
        self.names = {}
        for name in ("mp", "embedding", "dp", "dp_cp", "tp"):  # later names win for equal groups
            group = pstate.groups.get(name)
            if group is not None:
                self.names[group] = "dp" if name == "dp_cp" else name
        self.events: list[tuple[str, float, float]] = []
        self.patched: list[tuple[object, str, object]] = []

    def _wrap(self, fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            group = signature.bind_partial(*args, **kwargs).arguments.get("group")
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.events.append((self.names.get(group, "other"), start, time.perf_counter()))
        return timed

    def __enter__(self):
        from megalite.distributed import grad_buffer
        from megalite.tensor_parallel import mappings
        targets = [(dist, name) for name in COLLECTIVES]
        targets += [(module, name) for module in (mappings, grad_buffer)
                    for name in ("all_gather_single", "reduce_scatter_single") if hasattr(module, name)]
        for module, name in targets:
            original = getattr(module, name)
            self.patched.append((module, name, original))
            setattr(module, name, self._wrap(original))
        return self

    def __exit__(self, *exc):
        for module, name, original in reversed(self.patched):
            setattr(module, name, original)


def _train(rank, world, argv, warmup, iters, timeline_path):
    """One rank: build the Trainer, run warmup + timed iterations; return spans and collectives."""
    from megalite.config import parse_args
    from megalite.data.build import build_datasets
    from megalite.parallel_state import ParallelState
    from megalite.training import BatchIterator, Trainer

    cfg = parse_args(argv + ["--train-iters", str(warmup + iters), "--timeline-file", timeline_path],
                     world_size=world)
    p = cfg.parallel
    pstate = ParallelState.from_sizes(tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size)
    (train_ds, _, _), vocab = build_datasets(cfg, log=lambda msg: None)
    trainer = Trainer(cfg, pstate, vocab, log=lambda msg: None)
    batches = BatchIterator(train_ds, cfg, pstate)
    data = [batches.next_microbatches(cfg.num_microbatches) for _ in range(warmup + iters)]
    steps = []
    with CollectiveTimer(pstate) as timer:
        for i, microbatches in enumerate(data):
            if i == warmup:
                timer.events.clear()
            start = time.perf_counter()
            trainer.train_step(microbatches)
            steps.append((start, time.perf_counter()))
    trainer.timeline.save(timeline_path)
    return {"rank": rank, "steps": steps[warmup:], "collectives": timer.events, "pp_size": pstate.pp_size,
            "microbatches": cfg.num_microbatches}


# -- analysis ---------------------------------------------------------------------------
def _inside(event, spans) -> bool:
    return any(s <= event[1] and event[2] <= e for _, s, e in spans)


def analyse(results: list[dict], timeline_path: str, iters: int) -> list[dict]:
    """Per rank and timed iteration: step, compute, comm by group, p2p, bubble (ms / fraction)."""
    ranks = plot_timeline.load(timeline_path)
    rows = []
    for i in range(-iters, 0):
        selected = plot_timeline.select_iteration(ranks, i)
        _, _, bubbles = plot_timeline.bubble_fractions(selected)
        for res, data, bubble in zip(results, selected, bubbles):
            step_start, step_end = res["steps"][i]
            compute_spans = [ev for ev in data["events"] if ev[0] in plot_timeline.COMPUTE]
            comm = {"tp": 0.0, "dp": 0.0, "other": 0.0}
            in_compute = 0.0
            for ev in res["collectives"]:
                if step_start <= ev[1] and ev[2] <= step_end:
                    key = ev[0] if ev[0] in ("tp", "dp") else "other"
                    comm[key] += ev[2] - ev[1]
                    if _inside(ev, compute_spans):
                        in_compute += ev[2] - ev[1]
            step = step_end - step_start
            compute = bubble["busy"] - in_compute
            rows.append({"rank": res["rank"], "pp_size": res["pp_size"], "m": res["microbatches"], "step": step,
                         "compute": compute, **comm, "p2p": bubble["comm"], "bubble": bubble["bubble"],
                         "rest": step - compute - sum(comm.values()) - bubble["comm"]})
    return rows


def run_layout(name: str, threads: int, warmup: int, iters: int, workdir: str, round_index: int) -> list[dict]:
    world, flags = LAYOUTS[name]
    path = os.path.join(workdir, f"{name}_round{round_index}")
    results = launch(_train, world, MODEL + TRAINING + flags, warmup, iters, path,
                     threads=max(1, threads // world))
    return analyse(results, path, iters)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", default=DEFAULT_LAYOUTS, choices=list(LAYOUTS),
                        help=f"default {' '.join(DEFAULT_LAYOUTS)}; tp2pp2dp2 runs 8 processes")
    parser.add_argument("--rounds", type=int, default=3, help="launches of every layout (default 3)")
    parser.add_argument("--iters", type=int, default=4, help="timed iterations per launch")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per launch")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per layout (split over its processes)")
    args = parser.parse_args(argv)
    rows: dict[str, list[dict]] = {name: [] for name in args.layouts}
    with tempfile.TemporaryDirectory() as workdir:
        for r in range(args.rounds):
            for name in (args.layouts if r % 2 == 0 else args.layouts[::-1]):
                rows[name] += run_layout(name, args.threads, args.warmup, args.iters, workdir, r)
    print(f"model: {' '.join(MODEL[:-4])}; global batch 16 sequences; micro-batches of 2 (tp2pp2dp2: of 1); "
          f"fp32; {args.threads} torch threads per layout (at least 1 per process); {os.cpu_count()} CPUs visible; "
          f"load average {os.getloadavg()[0]:.1f}")
    serial = statistics.median(r["step"] for r in rows["serial"]) if "serial" in rows else None
    print("\n| layout | rank | step (ms) | vs 1 process | compute (ms) | TP comm | DP comm | other comm | p2p "
          "| rest | bubble (measured) | bubble (theory) |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, layout_rows in rows.items():
        world = LAYOUTS[name][0]
        pp, m = layout_rows[0]["pp_size"], layout_rows[0]["m"]  # m: micro-batches per pipeline
        theory = f"{plot_timeline.theory(pp, m):.3f}" if pp > 1 else "-"
        for rank in range(world):
            mine = [r for r in layout_rows if r["rank"] == rank]
            med = {k: statistics.median(r[k] for r in mine)
                   for k in ("step", "compute", "tp", "dp", "other", "p2p", "rest", "bubble")}
            ratio = f"{med['step'] / serial:.2f}" if serial else "-"
            print(f"| {name} | {rank} | {1e3 * med['step']:.0f} | {ratio} | {1e3 * med['compute']:.0f} | "
                  f"{1e3 * med['tp']:.0f} | {1e3 * med['dp']:.0f} | {1e3 * med['other']:.0f} | "
                  f"{1e3 * med['p2p']:.0f} | {1e3 * med['rest']:.0f} | "
                  f"{med['bubble']:.3f} | {theory} |")


if __name__ == "__main__":
    main()
