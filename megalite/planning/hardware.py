"""What the estimates assume about the machine: memory, peak FLOP/s, bandwidths, kernels."""
from __future__ import annotations

from dataclasses import dataclass

GiB = 2.0 ** 30


@dataclass
class Hardware:
    """What the estimates assume about the machine (the ``tools/plan.py`` flags)."""
    device_memory_gb: float = 80.0   # GiB per device
    peak_tflops: float = 989.0       # dense bf16 peak per device (H100 SXM)
    efficiency: float = 0.5          # achieved fraction of the peak in the model's matmuls
    intra_node_gbps: float = 200.0   # GB/s per device inside a node (NVLink, achieved bus bandwidth)
    inter_node_gbps: float = 25.0    # GB/s per device across nodes (InfiniBand / RoCE)
    gpus_per_node: int = 8
    device: str = "cuda"             # "cpu": dropout masks are stored in the activation dtype, and
    #                                   SDPA falls back to the math path when attention dropout > 0

