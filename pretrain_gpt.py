"""Pretrain a GPT with tensor, pipeline and data parallelism (Megatron-LM flag names).

    torchrun --nproc_per_node 4 pretrain_gpt.py --tensor-model-parallel-size 2

With no data flag the built-in corpus (the Python standard library's sources) is used.
This file is the only place that reads the launcher's environment variables.
"""
import datetime
import os
import sys

import torch
import torch.distributed as dist

from megalite.config import parse_args
from megalite.data.build import build_datasets
from megalite.monitoring import rank_table_for
from megalite.parallel_state import ParallelState, default_backend
from megalite.training import pretrain


def init_distributed() -> tuple[int, int, torch.device]:
    """Join torchrun's process group (if launched by it); return rank, world size, device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(minutes=10)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent hosts the store. Key it by restart attempt: otherwise, after an elastic
        # restart, gloo can read a dead peer's address left by the previous attempt and fail.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=False, timeout=timeout)
        dist.init_process_group(default_backend(), store=dist.PrefixStore(f"megalite/attempt_{attempt}", store),
                                rank=rank, world_size=world_size, timeout=timeout)
    elif "MASTER_ADDR" in os.environ:
        dist.init_process_group(default_backend(), rank=rank, world_size=world_size, timeout=timeout)
    return rank, world_size, device


def main(argv=None) -> None:
    rank, world_size, device = init_distributed()
    cfg = parse_args(argv, world_size=world_size)
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        cfg.logging.inject_fault_at_iteration = None  # the fault is injected in the first attempt only
    p = cfg.parallel
    vpp = None
    if p.num_layers_per_virtual_pipeline_stage:
        vpp = cfg.model.num_layers // p.pipeline_model_parallel_size // p.num_layers_per_virtual_pipeline_stage
    pstate = ParallelState.from_sizes(tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
                                      cp=p.context_parallel_size, vpp=vpp)
    log = (lambda msg: print(msg, flush=True))
    quiet = (lambda msg: None)
    if rank == 0:
        log(f"megalite: world size {world_size} = TP {pstate.tp_size} x PP {pstate.pp_size} x "
            f"CP {pstate.cp_size} x DP {pstate.dp_size}; {cfg.num_microbatches} micro-batches of "
            f"{cfg.training.micro_batch_size} per iteration; device {device.type}")
        log(rank_table_for(cfg))  # which rank holds which (tp, pp, dp, cp) and which layers
    # Rank 0 builds the data caches first; the others then only read them.
    if rank == 0:
        datasets, vocab_size = build_datasets(cfg, log)
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        datasets, vocab_size = build_datasets(cfg, quiet)
    pretrain(cfg, pstate, datasets, vocab_size, device=device, log=log)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
