"""Pretrain a GPT with tensor, pipeline and data parallelism (Megatron-LM flag names).

    torchrun --nproc_per_node 4 pretrain_gpt.py --tensor-model-parallel-size 2

With no data flag the built-in corpus (the Python standard library's sources) is used.
``--device`` (auto, cuda, cpu) picks where each process trains: one GPU per process, or the CPU.
This file is the only place that reads environment variables: the launcher's, and
``MEGALITE_DEBUG=1`` (show the traceback of a user-facing error instead of one line).
"""
import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist

from megalite.config import parse_args
from megalite.data.build import build_datasets
from megalite.model.backends import missing_backends
from megalite.optimizer.nonfinite import NonFiniteGradientsError
from megalite.parallel_state import ParallelState
from megalite.training import Trainer, check_same_flags_on_all_ranks, train
from megalite.training.device import DeviceUnavailable, choose_device, process_group_backend
from megalite.training.monitoring import missing_monitoring_backends, rank_table_for


def local_device(requested: str) -> torch.device:
    """This process's device for ``--device``, from torchrun's LOCAL_RANK and LOCAL_WORLD_SIZE and
    the GPUs this process can see (raises DeviceUnavailable with a one-line message)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1)))
    gpus = torch.cuda.device_count() if requested != "cpu" and torch.cuda.is_available() else 0
    return choose_device(requested, local_rank, local_world_size, gpus)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join torchrun's process group (if launched by it), NCCL on CUDA, gloo on the CPU; return
    rank and world size."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = process_group_backend(device)
    timeout = datetime.timedelta(minutes=10)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent hosts the store. Key it by restart attempt: otherwise, after an elastic
        # restart, gloo can read a dead peer's address left by the previous attempt and fail.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=dist.PrefixStore(f"megalite/attempt_{attempt}", store),
                                rank=rank, world_size=world_size, timeout=timeout)
    elif "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    return rank, world_size


def log_node_ranks(pstate: ParallelState, log) -> None:
    """Each node's local rank 0 prints one line: the node, its ranks and their (tp, pp, dp, cp)."""
    node = (os.environ.get("GROUP_RANK", "0"), os.environ.get("GROUP_WORLD_SIZE", "1"), socket.gethostname())
    coords = (pstate.tp_rank, pstate.pp_rank, pstate.dp_rank, pstate.cp_rank)
    everyone = [None] * pstate.world_size
    dist.all_gather_object(everyone, (node, pstate.rank, coords))  # collective: every rank joins
    if os.environ.get("LOCAL_RANK", "0") == "0":
        ranks = ", ".join(f"{r} (tp {t}, pp {p}, dp {d}, cp {c})"
                          for n, r, (t, p, d, c) in sorted(everyone, key=lambda e: e[1]) if n == node)
        log(f"megalite: node {node[0]} of {node[1]} ({node[2]}): ranks {ranks}")


def check_optional_packages(cfg, device: torch.device) -> list[str]:
    """One message per flag that asks for an optional package that is missing (or needs CUDA)."""
    return missing_backends(cfg.model, device) + missing_monitoring_backends(cfg.logging)


def install_fault(trainer, iteration: int | None, fault_rank: int) -> None:
    """``--inject-fault-at-iteration`` (testing): kill ``fault_rank`` once ``iteration`` has
    finished (saved included), when the next one starts, as a crashed rank would die."""
    if iteration is None or trainer.pstate.rank != fault_rank:
        return
    train_step = trainer.train_step

    def train_step_or_die(microbatches):
        if trainer.iteration == iteration:
            print(f"> injected fault: rank {fault_rank} exits after iteration {iteration}", flush=True)
            os._exit(17)
        return train_step(microbatches)
    trainer.train_step = train_step_or_die


def run(cfg, rank: int, world_size: int, device: torch.device) -> None:
    """Lay out, build the data and the trainer, train."""
    missing = check_optional_packages(cfg, device)
    if missing:  # one line, as argparse reports a bad flag
        print(f"pretrain_gpt.py: error: {'; '.join(missing)}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if dist.is_initialized():  # torchrun counts restarts per node: a node restarted because another
        counts = [None] * world_size  # node re-joined the rendezvous keeps its count; agree on the max
        dist.all_gather_object(counts, restarts)
        restarts = max(counts)
    check_same_flags_on_all_ranks(cfg)  # before the process groups, which differing flags would hang
    pstate = ParallelState.from_config(cfg)
    log = (lambda msg: print(msg, flush=True))
    if rank == 0:
        log(f"megalite: world size {world_size} = TP {pstate.tp_size} x PP {pstate.pp_size} x "
            f"CP {pstate.cp_size} x DP {pstate.dp_size}; {cfg.num_microbatches} micro-batches of "
            f"{cfg.training.micro_batch_size} per iteration; device {device.type}")
        log(rank_table_for(cfg))  # which rank holds which (tp, pp, dp, cp) and which layers
    if dist.is_initialized() and world_size > 1:
        log_node_ranks(pstate, log)
    # Rank 0 builds the data caches first; the others then only read them.
    if rank == 0:
        datasets, vocab_size = build_datasets(cfg, log)
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        datasets, vocab_size = build_datasets(cfg, lambda msg: None)
    trainer = Trainer(cfg, pstate, vocab_size, device=device, log=log)
    if restarts == 0:  # the fault is injected in the first attempt only
        install_fault(trainer, cfg.logging.inject_fault_at_iteration, cfg.logging.inject_fault_rank)
    train(trainer, datasets)


def main(argv=None) -> int:
    """Train; on a user-facing error (missing or corrupt data or checkpoint files, inconsistent
    input, a NaN streak) print one ``megalite: error: ...`` line and return 1 (the traceback
    only with ``MEGALITE_DEBUG=1``). A ``--device`` this node cannot serve (fewer GPUs than
    processes) prints one line from local rank 0, before any process group, and returns 2."""
    cfg = parse_args(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")))  # a bad flag stops here
    try:
        device = local_device(cfg.training.device)
    except DeviceUnavailable as e:  # the same on every local rank: local rank 0 says it, once per node
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"pretrain_gpt.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    rank, world_size = init_distributed(device)
    try:
        run(cfg, rank, world_size, device)
    except (NonFiniteGradientsError, OSError, ValueError, KeyError) as e:
        if os.environ.get("MEGALITE_DEBUG") == "1":
            raise
        # A NaN streak stops every rank at once: rank 0 speaks for all. Other errors may hit one rank only.
        if rank == 0 or not isinstance(e, NonFiniteGradientsError):
            where = f"rank {rank}: " if world_size > 1 and not isinstance(e, NonFiniteGradientsError) else ""
            message = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"megalite: error: {where}{message}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 1
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
