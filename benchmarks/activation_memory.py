"""Activation memory of one transformer layer: measured on CPU vs Korthikanti et al. (2022).

    python benchmarks/activation_memory.py            # prints the markdown tables of docs/performance.md

What is measured: the bytes a layer's forward keeps alive *for the backward*, i.e. every
tensor autograd saves (``torch.autograd.graph.saved_tensors_hooks``), de-duplicated by
storage (a view keeps its whole storage alive, so a storage counts once, in full) and
excluding the parameters. That is the peak of activation memory the layer adds during the
forward (saved tensors only accumulate until backward). The layer's input counts (its
LayerNorm saves it), as in the paper.

Runs: no recompute, selective recompute (core attention) and full recompute, at TP=1, and at
TP=2 without and with sequence parallelism (two gloo processes spawned by this script).
Dropout is on (0.1 on attention probabilities and the residual branches) as in the paper.

The paper's per-layer formula (fp16 activations, 1-byte dropout masks), with ``t`` = TP:
``s b h (10 + 24/t + 5 a s/(h t))`` without SP, ``s b h/t (34 + 5 a s/h)`` with SP,
``34 s b h / t`` with selective recompute (+SP), ``2 s b h`` with full recompute. We count
element by element so the same formula can be evaluated for other element sizes: our run is
fp32 (4 bytes) and CPU dropout keeps a float mask (4 bytes, not a 1-byte bool), see
:func:`formula_bytes`.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scaling import launch  # noqa: E402  (spawns gloo processes; puts the repository on sys.path)

MODES = ("none", "selective", "full")


def formula_bytes(s, b, h, a, t=1, sp=False, mode="none", elem=2, mask=1) -> float:
    """Korthikanti et al.'s per-layer activation bytes with ``elem``-byte tensors, ``mask``-byte masks.

    Per layer, in units of ``s b h`` elements: LayerNorm inputs 2, QKV and fc1 inputs 1 each
    (replicated across TP unless SP), two residual-dropout masks; Q, K, V 3, projection input 1,
    GeLU input 4, fc2 input 4 (split across TP). In units of ``a s^2 b``: softmax output and
    dropout output (elem) and the dropout mask, split across TP. With elem=2, mask=1 this is the
    paper's ``sbh (10 + 24/t + 5as/(ht))``.
    """
    replicated = 1.0 / t if sp else 1.0
    if mode == "full":  # only the layer input is kept
        return s * b * h * elem * replicated
    sbh = s * b * h * ((4 * elem + 2 * mask) * replicated + 12 * elem / t)
    attn = a * s * s * b * (2 * elem + mask) / t
    return sbh + (0.0 if mode == "selective" else attn)


class SavedTensorMeter:
    """Sum the storages autograd saves (once each), excluding ``exclude`` (parameters);
    ``regions`` attributes each new storage to the module running when it was first saved."""

    def __init__(self, exclude=()):
        self.seen: dict[int, int] = {}
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.region, self.by_region = "input", {}

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.exclude and key not in self.seen and storage.nbytes() > 0:
            self.seen[key] = storage.nbytes()
            self.by_region[self.region] = self.by_region.get(self.region, 0) + storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def _track_regions(layer, meter: SavedTensorMeter) -> None:
    """Name what saves what: submodules, the core attention, and the layer's own residual dropouts."""
    after = {"attention.qkv": "attention q/k/v", "mlp.fc1": "mlp activation"}
    for name in ("norm_1", "attention.qkv", "attention.proj", "norm_2", "mlp.fc1", "mlp.fc2"):
        module = layer.get_submodule(name)
        module.register_forward_pre_hook(lambda *_, n=name: setattr(meter, "region", n))
        module.register_forward_hook(lambda *_, n=after.get(name, "residual dropout"): setattr(meter, "region", n))
    core = layer.attention.core_attention

    def core_attention(*args):
        meter.region = "core attention"
        return core(*args)
    layer.attention.core_attention = core_attention


def measure(args, mode: str, sequence_parallel: bool, breakdown: bool = False):
    """Saved bytes of one layer's forward on this rank (TP from the current process group)."""
    from megalite.config import Config, ModelConfig, validate
    from megalite.model.gpt import _run_chunk
    from megalite.model.transformer import ParallelContext, TransformerLayer
    from megalite.parallel_state import ParallelState
    from megalite.tensor_parallel import checkpoint, model_parallel_seed

    cfg = Config(model=ModelConfig(num_layers=1, hidden_size=args.hidden, num_attention_heads=args.heads,
                                   seq_length=args.seq, attention_dropout=0.1, hidden_dropout=0.1,
                                   recompute_granularity="selective" if mode == "selective" else None))
    validate(cfg)
    tp = dist.get_world_size() if dist.is_initialized() else 1
    ps = ParallelState.from_sizes(tp=tp)
    tracker = model_parallel_seed(1234, ps.tp_rank)
    layer = TransformerLayer(cfg.model, ParallelContext(ps, tracker, sequence_parallel)).train()
    meter = SavedTensorMeter(exclude=list(layer.parameters()))
    if breakdown:
        _track_regions(layer, meter)
    s_local = args.seq // tp if sequence_parallel else args.seq
    x = torch.randn(s_local, args.batch, args.hidden, requires_grad=True)
    with meter.hooks():
        if mode == "full":
            y = checkpoint(_run_chunk([layer]), tracker, x)
        else:
            y = layer(x)
    y.sum().backward()  # the saved tensors do serve a working backward
    assert x.grad is not None and x.grad.shape == x.shape
    return meter.total, dict(meter.by_region)


def _measure_all_modes(rank, world, args) -> dict:
    return {(mode, sp): measure(args, mode, sp)[0] for sp in (False, True) for mode in MODES}


def measure_tp(args, world: int) -> dict:
    """Rank 0's saved bytes per (recompute mode, SP) on ``world`` gloo processes (TP = world)."""
    return launch(_measure_all_modes, world, args)[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args(argv)
    s, b, h, a, t = args.seq, args.batch, args.hidden, args.heads, args.tp
    mib = 2.0 ** 20
    rows = [(1, False, mode, measure(args, mode, False)[0]) for mode in MODES]
    tp_results = measure_tp(args, t)
    rows += [(t, sp, mode, tp_results[(mode, sp)]) for sp in (False, True) for mode in MODES]

    print(f"s={s} b={b} h={h} a={a} (5as/h = {5 * a * s / h:g}); fp32 activations; dropout 0.1; "
          f"bytes per layer per rank; sbh = {s * b * h} elements\n")
    print("| TP | SP | recompute | measured (MiB) | measured / sbh | paper fp16 (MiB) | paper, fp32 + "
          "float masks (MiB) | measured / fp32 formula |")
    print("|---|---|---|---|---|---|---|---|")
    for tp, sp, mode, got in rows:
        paper = formula_bytes(s, b, h, a, tp, sp, mode)
        fp32 = formula_bytes(s, b, h, a, tp, sp, mode, elem=4, mask=4)
        print(f"| {tp} | {'on' if sp else 'off'} | {mode} | {got / mib:.3f} | {got / (s * b * h):.1f} | "
              f"{paper / mib:.3f} | {fp32 / mib:.3f} | {got / fp32:.2f} |")

    _, regions = measure(args, "none", False, breakdown=True)
    print("\nWhere the bytes go (TP=1, no recompute), in units of sbh bytes:\n")
    print("| saved by | measured / sbh |")
    print("|---|---|")
    for name, nbytes in regions.items():
        print(f"| {name} | {nbytes / (s * b * h):.2f} |")
    print(f"| **total** | **{sum(regions.values()) / (s * b * h):.2f}** |")


if __name__ == "__main__":
    main()
