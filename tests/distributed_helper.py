"""Run a function on N gloo processes: the one spawn helper every multi-process test uses.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes (forkserver, with
torch preloaded so each start is cheap), initialises a gloo process group on a free port in
each, calls ``fn(rank, world_size, *args)`` and returns the list of results by rank.
A rank that raises makes the call raise with that rank's traceback; a hang past ``timeout``
seconds kills every process and fails the test instead of blocking CI.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue as queue_module
import socket
import time
import traceback

_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["torch", "torch.distributed", "megalite.tensor_parallel"])
    return _CONTEXT


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, results, timeout):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # N processes on 2 cores: avoid oversubscription
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        result = fn(rank, world_size, *args)
        results.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 120.0):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank."""
    ctx = _context()
    port = free_port()
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, results, timeout), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    outcome: dict[int, tuple[str, object]] = {}
    try:
        while len(outcome) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outcome))
                raise TimeoutError(f"ranks {missing} of {world_size} did not finish within {timeout:.0f}s "
                                   f"(hang or deadlock); finished: {sorted(outcome)}")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outcome]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
            outcome[rank] = (status, payload)
    finally:
        for p in procs:
            p.join(timeout=5 if len(outcome) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return [outcome[r][1] for r in range(world_size)]
