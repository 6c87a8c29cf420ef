"""Time per training iteration: megalite (TP = PP = DP = 1) vs a plain PyTorch GPT, side by side.

    python benchmarks/step_time.py                     # both configs, prints the tables of docs/performance.md
    python benchmarks/step_time.py --configs small --reps 5 --iters 3

Both sides train the same architecture (benchmarks/reference_gpt.py is the plain one) from the
same weights (megalite's initial weights are copied into the reference) on the same tokens,
with the same AdamW (weight-decay groups, betas, eps, and the same torch implementation: the
fused kernel megalite picks; ``--default-adamw-column`` adds the reference with torch's default
one), constant learning rate and grad-norm clipping at 1.0, fp32, in one process. First the
losses of both are compared for a few steps (the architectures and updates must match: same
loss to ~1e-6), then the step time is measured: ``--reps`` rounds, each running ``--warmup``
untimed iterations of every implementation, then ``--iters`` timed iterations of each,
alternating implementation by implementation (the order flips between rounds), so that load
from other processes on a shared machine hits all columns alike. The table gives the median
over all timed iterations and the ratio of medians (megalite / reference).

megalite is driven exactly as ``pretrain`` drives it: ``megalite.config.parse_args`` +
``megalite.training.Trainer`` and ``Trainer.train_step`` on pre-built micro-batches (so data
loading is excluded on both sides). With ``megatron.core`` importable, its ``GPTModel`` is a
third column (best effort: megatron-core is a test dependency only; on CPU two CUDA-only spots of it
are patched, see ``_megatron_cpu_shims``). It has the same parameter count but its own
initialisation, so its loss is not compared, only its time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reference_gpt  # noqa: E402

from megalite.config import parse_args  # noqa: E402
from megalite.model.context_parallel import get_batch_on_this_cp_rank  # noqa: E402
from megalite.parallel_state import ParallelState  # noqa: E402
from megalite.training import Trainer  # noqa: E402

CONFIGS = {
    "small": dict(num_layers=4, hidden_size=256, num_attention_heads=4, seq_length=256, micro_batch_size=8,
                  vocab_size=8192),
    "large": dict(num_layers=8, hidden_size=512, num_attention_heads=8, seq_length=512, micro_batch_size=4,
                  vocab_size=8192),
    "tiny": dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, micro_batch_size=2,
                 vocab_size=100),  # the smoke test's (vocab padded to 128 in megalite)
}
LR, WEIGHT_DECAY, CLIP = 1e-3, 0.01, 1.0


def describe(c: dict, microbatches: int) -> str:
    return (f"L={c['num_layers']} h={c['hidden_size']} a={c['num_attention_heads']} s={c['seq_length']} "
            f"mb={c['micro_batch_size']} x {microbatches} V={c['vocab_size']}")


def make_batches(c: dict, count: int, seed: int = 0) -> list[dict]:
    """``count`` micro-batches of random tokens, in the form megalite's BatchIterator yields."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        samples = torch.randint(0, c["vocab_size"], (c["micro_batch_size"], c["seq_length"] + 1), generator=gen)
        tokens, labels = samples[:, :-1].contiguous(), samples[:, 1:].contiguous()
        batch = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones_like(labels, dtype=torch.float32)}
        batches.append(get_batch_on_this_cp_rank(batch, 0, 1))
    return batches


def build_megalite(c: dict, microbatches: int, extra: tuple[str, ...] = ()) -> Trainer:
    argv = ["--num-layers", str(c["num_layers"]), "--hidden-size", str(c["hidden_size"]),
            "--num-attention-heads", str(c["num_attention_heads"]), "--seq-length", str(c["seq_length"]),
            "--micro-batch-size", str(c["micro_batch_size"]),
            "--global-batch-size", str(c["micro_batch_size"] * microbatches),
            "--lr", str(LR), "--lr-decay-style", "constant", "--lr-warmup-iters", "0",
            "--weight-decay", str(WEIGHT_DECAY), "--clip-grad", str(CLIP), "--mock-data",
            "--vocab-size", str(c["vocab_size"]), *extra]
    cfg = parse_args(argv, world_size=1)
    return Trainer(cfg, ParallelState.from_sizes(), c["vocab_size"], log=lambda msg: None)


class MegaliteRunner:
    name = "megalite"

    def __init__(self, c: dict, microbatches: int):
        self.trainer = build_megalite(c, microbatches)

    def step(self, batches: list[dict]) -> float:
        return self.trainer.train_step(batches)["loss"]


class ReferenceRunner:
    """The plain GPT, from megalite's weights, with the AdamW implementation megalite uses
    (``default_adamw``: torch's default one instead, a column of its own)."""

    def __init__(self, c: dict, megalite: MegaliteRunner, default_adamw: bool = False):
        self.name = "plain PyTorch, torch's default AdamW" if default_adamw else "plain PyTorch"
        self.model = reference_gpt.ReferenceGPT(c["vocab_size"], c["seq_length"], c["hidden_size"],
                                                c["num_attention_heads"], c["num_layers"])
        reference_gpt.copy_from_megalite(self.model, megalite.trainer.model[0])
        fused = None if default_adamw else megalite.trainer.optimizer.param_groups[0]["fused"]
        self.optimizer = reference_gpt.reference_optimizer(self.model, LR, WEIGHT_DECAY, fused=fused)

    def step(self, batches: list[dict]) -> float:
        return reference_gpt.train_step(self.model, self.optimizer, batches, CLIP)[0]


def _megatron_cpu_shims() -> None:
    """Two CUDA-only spots on megatron-core's CPU path: its local attention takes the score buffer
    from a global buffer always allocated on ``torch.cuda.current_device()`` (allocate it on the
    CPU), and forks the CUDA RNG tracker around attention dropout (a no-op here: dropout is 0)."""
    import contextlib
    import functools
    import operator

    from megatron.core import tensor_parallel, utils

    tensor_parallel.get_cuda_rng_tracker().fork = lambda *args, **kwargs: contextlib.nullcontext()

    def get_tensor_on_cpu(self, tensor_shape, dtype, name, mem_alloc_context=None):
        numel = functools.reduce(operator.mul, tensor_shape, 1)
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = self.buffer[(name, dtype)] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(*tensor_shape)

    utils.GlobalMemoryBuffer.get_tensor = get_tensor_on_cpu


class MegatronCoreRunner:
    """megatron-core's GPTModel (local layer spec, CPU init) with torch AdamW; best effort."""
    name = "Megatron-Core"

    def __init__(self, c: dict, fused=None):
        import datetime
        import socket

        import torch.distributed as dist
        from megatron.core import parallel_state as mpu
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.models.gpt.gpt_model import GPTModel
        from megatron.core.transformer.transformer_config import TransformerConfig
        if not dist.is_initialized():
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                    timeout=datetime.timedelta(minutes=5))
        if not mpu.model_parallel_is_initialized():  # once per process: one column per config
            mpu.initialize_model_parallel(1, 1)
        if not torch.cuda.is_available():
            _megatron_cpu_shims()
        try:  # registers the RNG stream its dropout forks; may need CUDA
            from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
            model_parallel_cuda_manual_seed(1234)
        except Exception:  # noqa: BLE001
            pass
        config = TransformerConfig(num_layers=c["num_layers"], hidden_size=c["hidden_size"],
                                   num_attention_heads=c["num_attention_heads"], use_cpu_initialization=True,
                                   init_method_std=0.02, hidden_dropout=0.0, attention_dropout=0.0,
                                   bias_dropout_fusion=False, masked_softmax_fusion=False,
                                   bias_activation_fusion=False, gradient_accumulation_fusion=False,
                                   persist_layer_norm=False, params_dtype=torch.float32)
        self.model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=c["vocab_size"],
                              max_sequence_length=c["seq_length"], share_embeddings_and_output_weights=True,
                              position_embedding_type="learned_absolute")
        self.optimizer = reference_gpt.reference_optimizer(self.model, LR, WEIGHT_DECAY, fused=fused)
        s = c["seq_length"]
        self.mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)

    def step(self, batches: list[dict]) -> float:
        total = 0.0
        for mb in batches:
            loss = self.model(mb["tokens"], mb["position_ids"], self.mask, labels=mb["labels"]).mean() / len(batches)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total


def megatron_core_runner(c: dict, mega: MegaliteRunner):
    """A MegatronCoreRunner (same AdamW as ``mega``), or None with a printed note when
    megatron.core is absent or fails."""
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        print("note: megatron.core is not importable: the Megatron-Core column is skipped "
              "(pip install megatron-core to add it; it is not a megalite dependency)")
        return None
    try:
        runner = MegatronCoreRunner(c, mega.trainer.optimizer.param_groups[0]["fused"])
        runner.step(make_batches(c, 1))  # fails here, not in the middle of the timing
    except Exception as e:  # noqa: BLE001 - optional column: report and go on
        print(f"note: megatron-core's GPTModel did not train on CPU ({type(e).__name__}: {e}); column skipped")
        return None
    ours = sum(p.numel() for p in mega.trainer.model[0].parameters())
    theirs = sum(p.numel() for p in runner.model.parameters())
    print(f"Megatron-Core GPTModel (local spec, unfused attention): {theirs:,} parameters, megalite {ours:,}"
          + ("" if ours == theirs else " (DIFFERENT architectures: read its column with care)"))
    return runner


def compare_losses(c: dict, steps: int = 3, microbatches: int = 1) -> list[tuple[float, float]]:
    """Train megalite and the reference from the same weights on the same batches for ``steps``
    iterations; return ``(megalite loss, reference loss)`` per iteration."""
    mega = MegaliteRunner(c, microbatches)
    ref = ReferenceRunner(c, mega)
    data = [make_batches(c, microbatches, seed=i) for i in range(steps)]
    return [(mega.step(batches), ref.step(batches)) for batches in data]


def time_runners(runners: list, batches: list[dict], reps: int, iters: int, warmup: int) -> dict[str, list[float]]:
    """Per-iteration seconds of each runner over ``reps`` rounds. A round runs ``warmup`` untimed
    iterations of each runner, then ``iters`` timed iterations of each, alternating runner by
    runner (A B A B ..., and B A B A ... in the next round), so that a burst of load from other
    processes lands on all runners alike."""
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for rep in range(reps):
        order = runners if rep % 2 == 0 else runners[::-1]
        for runner in order:
            for _ in range(warmup):
                runner.step(batches)
        for _ in range(iters):
            for runner in order:
                start = time.perf_counter()
                runner.step(batches)
                times[runner.name].append(time.perf_counter() - start)
    return times


def run_config(name: str, reps: int, iters: int, warmup: int, microbatches: int, check_steps: int,
               megatron: bool = True, default_adamw: bool = False) -> dict:
    c = CONFIGS[name]
    print(f"\n## {name}: {describe(c, microbatches)}, fp32, {torch.get_num_threads()} threads")
    if check_steps:
        pairs = compare_losses(c, check_steps, microbatches)
        worst = max(abs(a - b) / abs(b) for a, b in pairs)
        print("loss check (same initial weights, same batches): " + ", ".join(
            f"it {i + 1}: {a:.6f} vs {b:.6f}" for i, (a, b) in enumerate(pairs)) + f" | max rel diff {worst:.1e}")
    torch.manual_seed(0)
    mega = MegaliteRunner(c, microbatches)
    runners = [mega, ReferenceRunner(c, mega)] + ([ReferenceRunner(c, mega, default_adamw=True)] if default_adamw else [])
    core = megatron_core_runner(c, mega) if megatron else None
    if core is not None:
        runners.append(core)
    batches = make_batches(c, microbatches)
    times = time_runners(runners, batches, reps, iters, warmup)
    medians = {k: statistics.median(v) for k, v in times.items()}
    ref = medians["plain PyTorch"]
    print(f"| implementation | median ms/iter | min | max | n | ratio to plain PyTorch |\n|---|---|---|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {1e3 * medians[k]:.1f} | {1e3 * min(v):.1f} | {1e3 * max(v):.1f} | {len(v)} "
              f"| {medians[k] / ref:.3f} |")
    return {"config": name, "medians": medians, "ratio": medians["megalite"] / ref, "times": times}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["small", "large"], choices=sorted(CONFIGS))
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per implementation and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations before each round's timing")
    parser.add_argument("--microbatches", type=int, default=1, help="micro-batches per iteration (grad accumulation)")
    parser.add_argument("--check-steps", type=int, default=3, help="iterations of the loss comparison (0: skip)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--no-megatron-core", action="store_true", help="do not try the Megatron-Core column")
    parser.add_argument("--default-adamw-column", action="store_true",
                        help="add a column: the plain GPT with torch's default AdamW (a per-tensor loop on CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    results = [run_config(name, args.reps, args.iters, args.warmup, args.microbatches, args.check_steps,
                          not args.no_megatron_core, args.default_adamw_column) for name in args.configs]
    print("\nsummary: " + "; ".join(f"{r['config']} megalite / plain PyTorch = {r['ratio']:.3f}" for r in results)
          + f" (load average at the end {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
