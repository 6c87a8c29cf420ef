"""A tensor-parallel MLP trained for a few steps; prints the loss on rank 0.

    torchrun --nproc_per_node 2 examples/tp_mlp.py

Each rank holds half of each weight; the loss equals the single-process run's.
"""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalite.parallel_state import ParallelState
from megalite.tensor_parallel import ColumnParallelLinear, RowParallelLinear


def main():
    dist.init_process_group("gloo")
    ps = ParallelState.from_sizes(tp=dist.get_world_size())
    torch.manual_seed(0)  # same seed on every rank: each keeps its slice of the same weights
    fc1 = ColumnParallelLinear(32, 128, tp_group=ps.tp_group)
    fc2 = RowParallelLinear(128, 32, tp_group=ps.tp_group)
    params = list(fc1.parameters()) + list(fc2.parameters())
    opt = torch.optim.SGD(params, lr=0.5)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    target = torch.sin(x)
    for step in range(20):
        loss = F.mse_loss(fc2(F.gelu(fc1(x))), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ps.rank == 0 and step % 5 == 4:
            print(f"step {step + 1:3d} | tp {ps.tp_size} | loss {loss.item():.6f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
