"""Which device one process trains on: the ``--device {auto,cuda,cpu}`` decision.

A pure function of what the launcher and the machine say (the flag, the local rank, the number
of processes on this node, the number of GPUs this process can see), so every case is tested
without a GPU. The entry point (``pretrain_gpt.py``) reads the launcher's environment and asks
CUDA for its device count, then calls :func:`choose_device`.

One GPU per process: local rank ``r`` trains on ``cuda:r``. A node with fewer visible GPUs than
processes is refused with one line (two processes on one GPU would each hold a full model and
optimizer and usually run out of memory, or, with a GPU ordinal past the last one, crash in
every process with "invalid device ordinal").
"""
from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cuda", "cpu")


class DeviceUnavailable(ValueError):
    """The requested device cannot serve every process of this node; ``str()`` is one line."""


def choose_device(requested: str, local_rank: int, local_world_size: int, gpu_count: int) -> torch.device:
    """The device of local rank ``local_rank`` of ``local_world_size`` processes on a node where
    each process sees ``gpu_count`` GPUs.

    ``cpu``: the CPU. ``cuda``: ``cuda:local_rank``; raises :class:`DeviceUnavailable` when there
    is no GPU or fewer GPUs than processes. ``auto``: CUDA when every process gets its own GPU,
    the CPU when there is no GPU, and :class:`DeviceUnavailable` in between (some GPUs, but fewer
    than processes), since sharing or skipping them silently would surprise either way."""
    if requested not in DEVICE_CHOICES:
        raise DeviceUnavailable(f"--device {requested}: choose one of {', '.join(DEVICE_CHOICES)}")
    if not 0 <= local_rank < local_world_size:
        raise DeviceUnavailable(f"local rank {local_rank} is outside this node's {local_world_size} processes")
    if requested == "cpu" or (requested == "auto" and gpu_count == 0):
        return torch.device("cpu")
    if gpu_count == 0:
        raise DeviceUnavailable("--device cuda: no CUDA device is visible (drop the flag, or use --device cpu)")
    if gpu_count < local_world_size:
        gpus = f"{gpu_count} visible GPU{'s' if gpu_count > 1 else ''}"
        raise DeviceUnavailable(f"{local_world_size} processes on this node but {gpus}: each process needs a GPU "
                                f"of its own. Start at most {gpu_count} per node (torchrun --nproc_per_node "
                                f"{gpu_count}), or train on the CPU: add --device cpu (or set CUDA_VISIBLE_DEVICES=)")
    return torch.device("cuda", local_rank)


def process_group_backend(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for CPU ones (also on a machine that has GPUs)."""
    return "nccl" if device.type == "cuda" else "gloo"
