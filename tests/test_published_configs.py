"""The planner on the published Megatron-LM configurations (1.7B to 1T parameters).

Source: Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM" (SC'21, arXiv:2104.04473), Table 1: weak scaling on Selene (DGX A100 80GB, 8 GPUs
per node, 312 TFLOP/s fp16 peak), GPT with V = 51200, s = 2048, mixed precision, activation
recomputation. The micro-batch sizes and interleaving (not in the table) come from the paper's
artifact script, NVIDIA/Megatron-LM ``examples/sc21/run_table_1.sh``.

``python tests/test_published_configs.py`` prints the table of docs/performance.md
("Published configurations").
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalite import planning  # noqa: E402
from megalite.config import parse_args  # noqa: E402

V, S = 51200, 2048
A100_80GB = planning.Hardware(device_memory_gb=80.0, peak_tflops=312.0, efficiency=0.5, intra_node_gbps=200.0,
                              inter_node_gbps=25.0, gpus_per_node=8)

# Table 1: parameters (billions, as printed), heads, hidden, layers, TP, PP, GPUs, global batch,
# achieved TFLOP/s per GPU, % of peak, aggregate PFLOP/s; then from run_table_1.sh: micro-batch
# size and --num-layers-per-virtual-pipeline-stage (None: plain 1F1B).
PUBLISHED = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 44, 4.4, 16, None),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138, 44, 8.8, 16, None),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142, 46, 18.2, 16, None),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, 43, 34.6, 8, None),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, 44, 70.8, 4, None),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140, 45, 143.8, 2, 5),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, 47, 227.1, 2, 5),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155, 50, 297.4, 1, 3),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163, 52, 410.2, 1, 1),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, 52, 502.0, 1, None),
]
IDS = [f"{row[0]}B" for row in PUBLISHED]


def paper_params(l: int, h: int) -> int:
    """The paper's Eq. 2, P = 12 l h^2 (1 + 13/12h + (V + s)/12lh), multiplied out (exact)."""
    return 12 * l * h * h + 13 * l * h + (V + S) * h


def paper_flops(batch: int, l: int, h: int) -> float:
    """The paper's Eq. 3 (with recomputation): F = 96 B s l h^2 (1 + s/6h + V/16lh)."""
    return 96 * batch * S * l * h * h * (1 + S / (6 * h) + V / (16 * l * h))


def config_for(row):
    """The adapter: a Table 1 row as pretrain_gpt.py flags (fp16, full recompute as the paper)."""
    _, a, h, l, tp, pp, gpus, batch, _, _, _, mbs, vl = row
    argv = ["--num-layers", str(l), "--hidden-size", str(h), "--num-attention-heads", str(a),
            "--seq-length", str(S), "--max-position-embeddings", str(S), "--mock-data", "--vocab-size", str(V),
            "--micro-batch-size", str(mbs), "--global-batch-size", str(batch), "--fp16",
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    if vl:
        argv += ["--num-layers-per-virtual-pipeline-stage", str(vl)]
    return parse_args(argv, world_size=gpus)


def plan_for(row) -> planning.Plan:
    return planning.plan(config_for(row), V, A100_80GB)


def predicted_tflops(pl: planning.Plan) -> float:
    return pl.times["flops"] / pl.cfg.world_size / pl.times["total"] / 1e12


@pytest.mark.parametrize("row", PUBLISHED, ids=IDS)
def test_table_transcription_is_consistent(row):
    """The copied row agrees with itself: Eq. 2 gives the printed size, TFLOP/s x GPUs the
    aggregate, TFLOP/s / 312 the % of peak, and the layout divides the GPUs and batch."""
    billions, _, h, l, tp, pp, gpus, batch, tflops, peak, aggregate, mbs, _ = row
    assert round(paper_params(l, h) / 1e9, 1) == billions
    assert abs(tflops * gpus / 1000 - aggregate) <= 0.5 * gpus / 1000 + 0.05  # TFLOP/s printed rounded
    assert round(100 * tflops / 312) == peak
    dp = gpus // (tp * pp)
    assert dp * tp * pp == gpus and batch % (mbs * dp) == 0


@pytest.mark.parametrize("row", PUBLISHED, ids=IDS)
def test_planner_parameter_count_matches_the_paper(row):
    billions, _, h, l = row[:4]
    pl = plan_for(row)
    assert pl.padded_vocab_size == V  # 51200 is a multiple of 128 x TP for every TP <= 8
    assert round(pl.total_params / 1e9, 1) == billions
    # exactly the paper's formula plus the final LayerNorm (2h), which Eq. 2 leaves out
    assert pl.total_params == paper_params(l, h) + 2 * h
    # TP shards of all stages add up to the model: replicated across TP are the learned positions
    # (s h), per layer 2 LayerNorms and the 2 row-parallel biases (6 h), and the final LayerNorm;
    # the last stage holds a tied copy of the word embedding when PP > 1
    tp, pp = row[4], row[5]
    replicated = S * h + 6 * h * l + 2 * h
    shards = sum(st["params"]["total"] for st in pl.stages) * tp - (tp - 1) * replicated
    assert shards == pl.total_params + (V * h if pp > 1 else 0)


@pytest.mark.parametrize("row", PUBLISHED, ids=IDS)
def test_planner_flops_bubble_memory_and_throughput(row):
    _, _, h, l, tp, pp, gpus, batch, tflops, _, _, mbs, vl = row
    pl = plan_for(row)
    assert pl.times["flops"] == pytest.approx(paper_flops(batch, l, h), rel=1e-12)  # same FLOP count as the paper
    m = batch // (mbs * (gpus // (tp * pp)))
    chunks = l // pp // vl if vl else 1
    assert pl.bubble == pytest.approx((pp - 1) / (chunks * m))
    assert pl.fits  # every configuration ran on 80 GB A100s
    assert 30 * 2 ** 30 < pl.peak_memory < 60 * 2 ** 30
    # first-order estimate at 50 % matmul efficiency vs measured: within 25 %, never above it by more than 5 %
    assert 0.75 * tflops <= predicted_tflops(pl) <= 1.05 * tflops


def markdown_table() -> str:
    rows = ["| model | heads | hidden | layers | TP | PP | VPP | GPUs | DP | batch | micro-batch | micro-batches | "
            "params (planner) | params per GPU (largest stage) | memory per GPU (GiB) | bubble | "
            "predicted TFLOP/s/GPU | measured TFLOP/s/GPU (% of peak) | predicted / measured |",
            "|" + "---|" * 19]
    for row in PUBLISHED:
        billions, a, h, l, tp, pp, gpus, batch, tflops, peak, _, mbs, vl = row
        pl = plan_for(row)
        dp = gpus // (tp * pp)
        per_gpu = max(st["params"]["total"] for st in pl.stages)
        pred = predicted_tflops(pl)
        rows.append(f"| {billions:g}B | {a} | {h} | {l} | {tp} | {pp} | {l // pp // vl if vl else 1} | {gpus} | {dp} "
                    f"| {batch} | {mbs} | {pl.cfg.num_microbatches} | {pl.total_params / 1e9:.2f}B "
                    f"| {per_gpu / 1e9:.2f}B | {pl.peak_memory / 2 ** 30:.1f} | {100 * pl.bubble:.1f}% "
                    f"| {pred:.0f} | {tflops} ({peak}%) | {pred / tflops:.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
