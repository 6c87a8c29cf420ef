"""Single-GPU training throughput: GPT-2 124M and a GPT-3-style 1.3B model, bf16, megalite's CUDA path.

    python benchmarks/gpu_step.py                                  # both models on cuda:0
    python benchmarks/gpu_step.py --models gpt2-124m --micro-batch-size 16 --microbatches 4
    python benchmarks/gpu_step.py --cpu-smoke                      # a tiny model on CPU: checks the script only

What runs is what ``torchrun --nproc_per_node 1 pretrain_gpt.py --bf16 ...`` runs on one GPU:
``megalite.training.Trainer`` (bf16 params, fp32 grad buffer and fp32 main weights, torch's
fused AdamW, SDPA attention, which picks its flash kernel for bf16 on CUDA, or flash-attn with
``--use-flash-attn`` when installed) and ``Trainer.train_step`` on random tokens already on the
GPU (no data loading). After ``--warmup`` iterations, ``--iters`` iterations are timed between
two ``torch.cuda.synchronize()`` calls. Printed per model: time per iteration, tokens/s,
TFLOP/s (megalite/planning/flops.py's model FLOPs, as the log line) and MFU against the device's dense
bf16 peak (megalite/training/monitoring.py's table, or ``--peak-tflops``), and the peak memory.

Without CUDA the script prints a note and exits 0 (unless ``--cpu-smoke``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalite.config import parse_args  # noqa: E402
from megalite.model.backends import is_installed  # noqa: E402
from megalite.training.monitoring import device_peak_tflops  # noqa: E402
from megalite.parallel_state import ParallelState  # noqa: E402
from megalite.training import Trainer  # noqa: E402

# name -> (layers, hidden, heads, seq, default micro-batch); vocabulary: GPT-2's 50257 (padded to 50304)
MODELS = {
    "gpt2-124m": (12, 768, 12, 1024, 8),
    "gpt3-1.3b": (24, 2048, 16, 2048, 2),
    "tiny": (2, 64, 4, 64, 2),  # --cpu-smoke
}
VOCAB = 50257


def build(name: str, micro_batch: int, microbatches: int, device: torch.device, flash: bool,
          extra: list[str]) -> Trainer:
    layers, hidden, heads, seq, _ = MODELS[name]
    argv = ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(heads),
            "--seq-length", str(seq), "--micro-batch-size", str(micro_batch),
            "--global-batch-size", str(micro_batch * microbatches), "--lr", "3e-4", "--lr-decay-style", "constant",
            "--lr-warmup-iters", "0", "--mock-data", "--vocab-size", str(VOCAB)]
    argv += ["--bf16"] if device.type == "cuda" else []
    argv += ["--use-flash-attn"] if flash else []
    cfg = parse_args(argv + extra, world_size=1)
    return Trainer(cfg, ParallelState.from_sizes(), VOCAB, device=device, log=lambda msg: None)


def random_batches(trainer: Trainer, device: torch.device, seed: int = 0) -> list[dict]:
    cfg = trainer.cfg
    gen = torch.Generator().manual_seed(seed)
    b, s = cfg.training.micro_batch_size, cfg.model.seq_length
    batches = []
    for _ in range(cfg.num_microbatches):
        samples = torch.randint(0, VOCAB, (b, s + 1), generator=gen).to(device)
        batches.append({"tokens": samples[:, :-1].contiguous(), "labels": samples[:, 1:].contiguous(),
                        "loss_mask": torch.ones(b, s, device=device),
                        "position_ids": torch.arange(s, device=device).expand(b, s)})
    return batches


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, args, device: torch.device) -> dict:
    micro_batch = args.micro_batch_size or MODELS[name][4]
    trainer = build(name, micro_batch, args.microbatches, device, args.use_flash_attn, args.extra)
    batches = random_batches(trainer, device)
    for _ in range(args.warmup):
        stats = trainer.train_step(batches)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        stats = trainer.train_step(batches)
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.iters
    cfg = trainer.cfg
    tokens = cfg.training.global_batch_size * cfg.model.seq_length
    model_flops = trainer.flops_per_iteration(include_recompute=False)
    peak = device_peak_tflops(device, args.peak_tflops)
    return {"model": name, "params": sum(p.numel() for p in trainer.buffer.params), "micro_batch": micro_batch,
            "global_batch": cfg.training.global_batch_size, "seq": cfg.model.seq_length, "ms": 1e3 * seconds,
            "tokens_per_s": tokens / seconds, "tflops": trainer.flops_per_iteration() / seconds / 1e12,
            "mfu": model_flops / seconds / (peak * 1e12) if peak else None, "loss": stats["loss"],
            "memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt2-124m", "gpt3-1.3b"], choices=list(MODELS))
    parser.add_argument("--micro-batch-size", type=int, help="default: 8 (124M), 2 (1.3B)")
    parser.add_argument("--microbatches", type=int, default=4, help="micro-batches per iteration (default 4)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: megalite/training/monitoring.py's table)")
    parser.add_argument("--use-flash-attn", action="store_true", help="flash-attn kernels (pip install flash-attn)")
    parser.add_argument("--cpu-smoke", action="store_true", help="run a tiny model on CPU (checks the script, no MFU)")
    parser.add_argument("extra", nargs="*", help="more megalite flags after --, e.g. -- --recompute-granularity selective")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        device, args.models = torch.device("cpu"), ["tiny"]
    elif not torch.cuda.is_available():
        print("note: CUDA is not available: gpu_step.py skipped (it needs a GPU; --cpu-smoke checks the script on CPU)")
        return 0
    else:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    if args.use_flash_attn and not is_installed("flash_attn"):
        parser.error("--use-flash-attn needs the flash-attn package (pip install flash-attn)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; bf16={device.type == 'cuda'}; "
          f"attention: {'flash-attn' if args.use_flash_attn else 'torch SDPA'}; AdamW: torch fused")
    print("\n| model | params | micro-batch x count | seq | ms/iter | tokens/s | TFLOP/s | MFU | peak memory (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        r = measure(model, args, device)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['memory_gib']:.1f}" if r["memory_gib"] is not None else "-"
        print(f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['micro_batch']} x {r['global_batch'] // r['micro_batch']} "
              f"| {r['seq']} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | {mfu} | {mem} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
