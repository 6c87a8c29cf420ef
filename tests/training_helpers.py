"""Run pretrain() on N gloo ranks with tiny models and compare loss curves to serial runs."""
from __future__ import annotations

import math

from distributed_helper import run_distributed

# A tiny GPT on mock data: 4 layers, hidden 32, seq 16; vocab 100 (padded differently per TP).
TINY = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "10", "--lr", "3e-3",
        "--lr-warmup-iters", "2", "--mock-data", "--vocab-size", "100", "--eval-interval", "0",
        "--log-interval", "1", "--clip-grad", "1.0"]


def _train(rank, world, argv):
    from megalite.config import parse_args
    from megalite.data.build import build_datasets
    from megalite.parallel_state import ParallelState
    from megalite.training import pretrain

    cfg = parse_args(argv, world_size=world)
    p = cfg.parallel
    vpp = None
    if p.num_layers_per_virtual_pipeline_stage:
        vpp = cfg.model.num_layers // p.pipeline_model_parallel_size // p.num_layers_per_virtual_pipeline_stage
    ps = ParallelState.from_sizes(tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
                                  cp=p.context_parallel_size, vpp=vpp)
    datasets, vocab = build_datasets(cfg, log=lambda m: None)
    lines = []
    history = pretrain(cfg, ps, datasets, vocab, log=lines.append)
    return {"history": history, "lines": lines}


def train(argv: list[str], world: int, timeout: float = 240.0) -> dict:
    """Train on ``world`` ranks; return the logging rank's losses, grad norms and log lines."""
    results = run_distributed(_train, world, argv, timeout=timeout)
    logging = [r for r in results if not math.isnan(r["history"][0]["loss"])]
    assert len(logging) == 1, f"expected exactly one logging rank, got {len(logging)}"
    return {"loss": [h["loss"] for h in logging[0]["history"]],
            "grad_norm": [h["grad_norm"] for h in logging[0]["history"]],
            "all_grad_norms": [[h["grad_norm"] for h in r["history"]] for r in results],
            "lines": logging[0]["lines"]}


def assert_curves_equal(ref: dict, got: dict, rtol: float = 1e-5) -> None:
    """Loss and grad-norm curves equal within ``rtol`` relative, iteration by iteration."""
    assert len(ref["loss"]) == len(got["loss"])
    for i, (a, b) in enumerate(zip(ref["loss"], got["loss"])):
        assert abs(a - b) <= rtol * abs(a), f"iteration {i + 1}: lm loss {b!r} != serial {a!r}"
    for i, (a, b) in enumerate(zip(ref["grad_norm"], got["grad_norm"])):
        assert abs(a - b) <= rtol * abs(a), f"iteration {i + 1}: grad norm {b!r} != serial {a!r}"
    for norms in got["all_grad_norms"]:  # every rank clips with the same global norm
        assert all(abs(a - b) <= rtol * abs(a) for a, b in zip(got["grad_norm"], norms))
