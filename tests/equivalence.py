"""The gradient-level equivalence harness: a layout computes what the serial model computes.

``run_layout(argv, world)`` trains with megalite's own loop (:func:`megalite.training.train`)
on ``world`` gloo ranks and returns, gathered to *global* parameter names (TP shards
reassembled, pipeline stages and virtual chunks merged, data-parallel and distributed-optimizer
shards joined, vocabulary padding stripped):

* ``grads``: every parameter's gradient of iteration 1 after the data-parallel reduction and
  unscaling, before clipping (what the optimizer clips and applies);
* ``params_0``: every parameter before the first iteration (after ``--load``, if any);
* ``params_1``: every parameter after the update of iteration 1;
* ``params``: every parameter at the end; ``loss`` and ``grad_norm`` per iteration.

While gathering it checks what must hold on any layout: replicas of a tensor (DP ranks, CP
ranks, TP ranks of a replicated param, the last stage's copy of a tied embedding) are
bit-identical, the shards cover every element, and vocabulary padding rows stay zero.
``assert_equivalent(ref, got)`` compares two runs with the tolerances below, stated once.

Adam normalises a wrongly scaled gradient away, so comparing losses alone cannot see a
missing reduction or a doubled grad: the grads and weights are compared directly.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from distributed_helper import run_distributed

# A tiny GPT on mock data; no warmup, so iteration 1 updates with lr > 0; clipping active.
# Adam's eps is 1e-4, not 1e-8: its step lr * g / (|g| + eps) turns a rounding difference d of a
# grad near 0 into a weight difference lr * d / eps, up to lr / 500 per step at eps 1e-8 (and the
# key bias, whose true grad is 0, gets steps of pure rounding noise). At 1e-4 every weight of
# every layout stays within 2e-5 of the serial one; eps is elementwise and layout-independent.
TINY = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "6", "--lr", "3e-3",
        "--lr-warmup-iters", "0", "--mock-data", "--vocab-size", "100", "--eval-interval", "0",
        "--log-interval", "1", "--clip-grad", "1.0", "--adam-eps", "1e-4"]


@dataclass(frozen=True)
class Tolerance:
    """``|got - ref| <= rtol * max|ref| + atol`` per tensor (max over the tensor: a relative
    bound per element would fail on elements that are 0 up to rounding)."""
    loss_rtol: float            # lm loss per iteration, relative
    norm_rtol: float            # grad norm per iteration, relative
    grad_rtol: float            # of the tensor's largest |grad|
    grad_atol: float
    param_rtol: float | None    # of the tensor's largest |weight|; None: weights not compared
    param_atol_lr: float = 0.0  # x the run's peak lr. Adam's step lr * g / (|g| + eps) moves a weight
    #                             by lr / eps per unit of grad near g = 0: a grad difference within
    #                             grad_rtol becomes a weight difference of a small fraction of lr


# fp32: any layout equals the serial run up to the order of floating-point sums (DESIGN.md section 8;
# measured on TINY: grads 5e-7 of the tensor's max, weights 3e-6 of the max or lr / 8500).
FP32 = Tolerance(loss_rtol=1e-5, norm_rtol=1e-5, grad_rtol=1e-5, grad_atol=1e-8, param_rtol=2e-5,
                 param_atol_lr=1 / 2000)
# bf16 / fp16 runs against the fp32 serial run (measured on TINY over 6 iterations: loss 1.3e-4 and
# 1.1e-5, grad norm 3.9e-3 and 1.0e-3, grads 1.9e-2 and 1.9e-3 of the tensor's max). Weights are not
# compared: Adam's first steps are +-lr for any grad well above eps, so a grad near 0 whose sign
# rounding flips moves that weight by 2 lr; a missing unscale (x loss scale) or reduction (x 1/2) is
# far outside the grad tolerances.
BF16 = Tolerance(loss_rtol=1e-3, norm_rtol=2e-2, grad_rtol=5e-2, grad_atol=1e-6, param_rtol=None)
FP16 = Tolerance(loss_rtol=1e-4, norm_rtol=5e-3, grad_rtol=1e-2, grad_atol=1e-6, param_rtol=None)


def _local_state(trainer) -> dict:
    """This rank's tensors by global name: params (+ shard metadata) and owned reduced grads."""
    from megalite.model import named_global_parameters

    params = {}
    for name, p in named_global_parameters(trainer.model):
        params.setdefault(name, []).append({
            "value": p.detach().float().numpy().copy(),
            "partition_dim": getattr(p, "partition_dim", 0) if getattr(p, "tensor_model_parallel", False) else None,
            "parts": getattr(p, "parts", 1), "real_rows": getattr(p, "real_rows", None),
            "shard": getattr(p, "expert_tp", (None,))[0]})  # MoE experts: the expert-TP rank
    return params


def _owned_grads(trainer) -> dict:
    """``name -> [(offset in the local tensor, values)]`` of the grads this rank's optimizer updates."""
    from megalite.model import named_global_parameters

    names = {id(p): name for name, p in named_global_parameters(trainer.model)}
    grads: dict[str, list] = {}
    for f in trainer.optimizer.fragments:
        grads.setdefault(names[id(f.param)], []).append((f.offset, f.main.grad.detach().numpy().copy()))
    return grads


def _capture(rank, world, argv, inject, wrapper):
    import torch.distributed
    from megalite.config import parse_args
    from megalite.data.build import build_datasets
    from megalite.parallel_state import ParallelState
    from megalite.training import Trainer, train

    cfg = parse_args(argv, world_size=world)
    ps = ParallelState.from_config(cfg)
    for builder in (0, 1):  # as pretrain_gpt.py: rank 0 builds the data caches, then the others read them
        if (rank == 0) == (builder == 0):
            datasets, vocab = build_datasets(cfg, log=lambda m: None)
        if world > 1:
            torch.distributed.barrier()
    lines: list[str] = []
    trainer = Trainer(cfg, ps, vocab, log=lines.append)
    captured: dict = {}
    opt = trainer.optimizer
    grad_norm, step = opt.grad_norm, opt.step

    def capturing_grad_norm():  # called by step() after unscaling, before clipping
        if trainer.iteration == 1:
            captured["grads"] = _owned_grads(trainer)
        return grad_norm()

    def capturing_step():
        result = step()
        if trainer.iteration == 1:
            captured["params_1"] = _local_state(trainer)
        return result
    train_step = trainer.train_step

    def capturing_train_step(microbatches):  # the first one: the initial (or loaded) params
        captured.setdefault("params_0", _local_state(trainer))
        return train_step(microbatches)
    opt.grad_norm, opt.step, trainer.train_step = capturing_grad_norm, capturing_step, capturing_train_step
    if wrapper is not None:
        datasets = tuple(None if d is None else wrapper(d) for d in datasets)
    if inject is not None:
        inject(trainer, rank)
    error = None
    try:
        history = train(trainer, datasets)
    except Exception as e:  # noqa: BLE001 - returned so the test can check it on every rank
        history, error = [], f"{type(e).__name__}: {e}"
    coords = {"tp": ps.tp_rank, "pp": ps.pp_rank, "dp": ps.dp_rank, "cp": ps.cp_rank, "tp_size": ps.tp_size}
    return {"history": history, "lines": lines, "coords": coords, "params": _local_state(trainer),
            "scaler": opt.scaler.state_dict(), "iteration": trainer.iteration, "error": error, **captured}


# -- gathering to global names -------------------------------------------------------------
def assemble(pieces: dict[int, dict], name: str) -> np.ndarray:
    """The full tensor from TP shards ``{tp_rank: piece}`` (written here, independent of the
    library's checkpoint code); padding rows must be zero and are stripped."""
    first = pieces[min(pieces)]
    if first["partition_dim"] is None:
        full = first["value"]
    else:
        dim, parts = first["partition_dim"], first["parts"]
        ordered = [pieces[r]["value"] for r in sorted(pieces)]
        blocks = [np.concatenate([np.split(v, parts, axis=dim)[b] for v in ordered], axis=dim) for b in range(parts)]
        full = np.concatenate(blocks, axis=dim)
    if first["real_rows"] is not None:
        padding = full[first["real_rows"]:]
        assert not np.isfinite(full).all() or not padding.any(), (  # (NaN grads reach every row)
            f"{name}: vocabulary padding rows are not zero (max {np.abs(padding).max()})")
        full = full[:first["real_rows"]]
    return full


def _shard(piece: dict, result: dict) -> int:
    """Which TP shard a piece is: the rank's TP rank, or for MoE experts its expert-TP rank."""
    return result["coords"]["tp"] if piece.get("shard") is None else piece["shard"]


def _gather_params(results: list[dict], key: str) -> dict[str, np.ndarray]:
    local: dict[tuple[str, int], dict] = {}
    for r in results:
        for name, copies in r[key].items():
            for piece in copies:
                tp_rank = _shard(piece, r)
                seen = local.setdefault((name, tp_rank), piece)
                assert np.array_equal(seen["value"], piece["value"], equal_nan=True), (
                    f"{key}: replicas of {name} (tp rank {tp_rank}) differ between ranks (e.g. rank with "
                    f"coordinates {r['coords']}): max diff {np.abs(seen['value'] - piece['value']).max()}")
    by_name: dict[str, dict[int, dict]] = {}
    for (name, tp_rank), piece in local.items():
        by_name.setdefault(name, {})[tp_rank] = piece
    full = {}
    for name, pieces in by_name.items():
        if pieces[min(pieces)]["partition_dim"] is None:  # replicated over TP: every copy identical
            values = [p["value"] for p in pieces.values()]
            assert all(np.array_equal(values[0], v, equal_nan=True) for v in values), f"{key}: TP replicas of {name} differ"
        full[name] = assemble(pieces, name)
    return full


def _gather_grads(results: list[dict]) -> dict[str, np.ndarray]:
    """Grads in the params' layout: each rank's owned pieces written into the local shards."""
    shapes = {}
    for r in results:
        for name, copies in r["params"].items():
            shapes[(name, _shard(copies[0], r))] = copies[0]
    local, covered = {}, {}
    for r in results:
        for name, pieces in r["grads"].items():
            tp_rank = _shard(r["params"][name][0], r)
            meta = shapes[(name, tp_rank)]
            flat = local.setdefault((name, tp_rank), np.zeros(meta["value"].size, dtype=np.float32))
            mask = covered.setdefault((name, tp_rank), np.zeros(meta["value"].size, dtype=bool))
            for offset, values in pieces:
                span = slice(offset, offset + values.size)
                both = mask[span]
                assert np.array_equal(flat[span][both], values[both], equal_nan=True), (
                    f"grads: replicas of {name} (tp rank {tp_rank}) differ between ranks")
                flat[span], mask[span] = values, True
    by_name: dict[str, dict[int, dict]] = {}
    for (name, tp_rank), flat in local.items():
        assert covered[(name, tp_rank)].all(), f"grads: the optimizer shards do not cover all of {name}"
        meta = shapes[(name, tp_rank)]
        by_name.setdefault(name, {})[tp_rank] = {**meta, "value": flat.reshape(meta["value"].shape)}
    return {name: assemble(pieces, name) for name, pieces in by_name.items()}


def gather(results: list[dict]) -> dict:
    """Merge the per-rank captures of one run (see the module docstring)."""
    logging = [r for r in results if r["history"] and not math.isnan(r["history"][0]["loss"])]
    errors = {r["error"] for r in results}
    out = {"error": errors.pop() if len(errors) == 1 else sorted(map(str, errors)), "per_rank": results,
           "params": _gather_params(results, "params")}
    if logging:
        assert len(logging) == 1, f"expected exactly one logging rank, got {len(logging)}"
        out["loss"] = [h["loss"] for h in logging[0]["history"]]
        out["grad_norm"] = [h["grad_norm"] for h in logging[0]["history"]]
        out["lr"] = [h["lr"] for h in logging[0]["history"]]
        out["lines"] = logging[0]["lines"]
        for r in results:  # every rank took the same decisions with the same global norm
            assert [h["updated"] for h in r["history"]] == [h["updated"] for h in logging[0]["history"]]
            assert np.allclose([h["grad_norm"] for h in r["history"]], out["grad_norm"], rtol=1e-6, equal_nan=True)
    if all("grads" in r for r in results):
        out["grads"] = _gather_grads(results)
    for key in ("params_0", "params_1"):
        if all(key in r for r in results):
            out[key] = _gather_params(results, key)
    return out


def run_layout(argv: list[str], world: int, inject=None, wrapper=None, timeout: float = 300.0) -> dict:
    """Train ``argv`` on ``world`` ranks and gather everything (see the module docstring).

    Picklable hooks for tests: ``inject(trainer, rank)`` runs on every rank before training
    (e.g. to register a grad hook); ``wrapper(dataset)`` replaces each dataset."""
    return gather(run_distributed(_capture, world, argv, inject, wrapper, timeout=timeout))


def inject_grad(trainer, rank, *, iteration: int | None, on_rank: int, value: float = float("inf"),
                name: str = "layers.0.mlp.fc1.weight") -> None:
    """Make ``name``'s grad ``value`` on rank ``on_rank`` in the backward of ``iteration`` (of
    every iteration when None); use with functools.partial as ``run_layout``'s ``inject``."""
    import torch

    from megalite.model import named_global_parameters

    if rank != on_rank:
        return
    for global_name, p in named_global_parameters(trainer.model):
        if global_name == name:  # during the backward of iteration k, trainer.iteration is k - 1
            p.register_hook(lambda g: torch.full_like(g, value) if iteration in (None, trainer.iteration + 1) else g)
            return
    raise ValueError(f"rank {rank} holds no {name}")


def iteration_lines(run: dict) -> list[str]:
    """The Megatron-format iteration lines the logging rank printed."""
    return [line for line in run["lines"] if line.startswith(" iteration") and "lm loss" in line]


@functools.lru_cache(maxsize=None)
def serial(extra: tuple = (), base: tuple = tuple(TINY)) -> dict:
    """The single-process run of ``base + extra``, cached for the whole test session."""
    return run_layout(list(base) + list(extra), 1)


# -- comparing -----------------------------------------------------------------------------
def assert_tensors_close(ref: dict, got: dict, rtol: float, atol: float, what: str) -> None:
    """Every tensor of ``got`` within ``rtol * max|ref| + atol`` of ``ref``, names and shapes equal."""
    assert sorted(got) == sorted(ref), f"{what}: names differ: {sorted(set(got) ^ set(ref))}"
    worst = []
    for name, want in ref.items():
        have = got[name]
        assert have.shape == want.shape, f"{what} {name}: shape {have.shape} != serial {want.shape}"
        diff = float(np.abs(have.astype(np.float64) - want).max())
        bound = rtol * float(np.abs(want).max()) + atol
        if not diff <= bound:
            worst.append(f"{name}: max diff {diff:.3g} > {bound:.3g}")
    assert not worst, f"{what} differ from the serial run:\n  " + "\n  ".join(worst)


def assert_equivalent(ref: dict, got: dict, tol: Tolerance = FP32) -> None:
    """Loss and grad norm per iteration, grads of iteration 1, params after iteration 1 and at the end."""
    assert got["error"] is None and ref["error"] is None, (ref["error"], got["error"])
    assert len(ref["loss"]) == len(got["loss"]) > 0, (len(ref["loss"]), len(got["loss"]))
    for i, (a, b) in enumerate(zip(ref["loss"], got["loss"])):
        assert abs(a - b) <= tol.loss_rtol * abs(a), f"iteration {i + 1}: lm loss {b!r} != serial {a!r}"
    for i, (a, b) in enumerate(zip(ref["grad_norm"], got["grad_norm"])):
        if not (math.isfinite(a) or math.isfinite(b)):  # both skipped (an injected inf)
            continue
        assert abs(a - b) <= tol.norm_rtol * abs(a), f"iteration {i + 1}: grad norm {b!r} != serial {a!r}"
    if "grads" in ref:
        assert ref["lr"][0] > 0, "iteration 1 must update (lr > 0) for the comparison to mean anything"
        assert_tensors_close(ref["grads"], got["grads"], tol.grad_rtol, tol.grad_atol, "grads of iteration 1")
    if tol.param_rtol is None:
        return
    atol = tol.param_atol_lr * max(ref["lr"])
    if "params_1" in ref:
        assert_tensors_close(ref["params_1"], got["params_1"], tol.param_rtol, atol, "params after iteration 1")
    assert_tensors_close(ref["params"], got["params"], tol.param_rtol, atol, "params at the end")
