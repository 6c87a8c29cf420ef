"""One rank's share of the work under a parallel layout: the shape of its micro-batch, its
model chunks, the micro-batches it holds at once, and the pipeline bubble."""
from __future__ import annotations

from ..config import Config


def local_dims(cfg: Config) -> tuple[int, int, int, int, bool]:
    """``(s, b, h, tp, sp)``: the sequence length per context-parallel rank, the micro-batch
    size, the hidden size, the TP size and whether sequence parallelism is on."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    s = m.seq_length // p.context_parallel_size
    return s, t.micro_batch_size, m.hidden_size, p.tensor_model_parallel_size, p.sequence_parallel


def model_chunks(cfg: Config) -> int:
    """Model chunks per pipeline rank (virtual pipeline stages; 1 without interleaving)."""
    p = cfg.parallel
    vl = p.num_layers_per_virtual_pipeline_stage
    return cfg.model.num_layers // p.pipeline_model_parallel_size // vl if vl else 1


def in_flight_microbatches(cfg: Config, pp_rank: int) -> int:
    """Forward passes (of one model chunk) whose activations a rank holds at its peak."""
    p = cfg.parallel
    pp, m = p.pipeline_model_parallel_size, cfg.num_microbatches
    if pp == 1:
        return 1
    if p.pipeline_schedule == "gpipe":
        return m
    chunks = model_chunks(cfg)
    if chunks == 1:
        return min(pp - pp_rank, m)
    total = m * chunks
    if m == pp:
        return total
    return min((pp - pp_rank - 1) * 2 + (chunks - 1) * pp + 1, total)


def pipeline_bubble(cfg: Config) -> float:
    """Bubble time over ideal compute time: ``(p - 1) / (v m)``."""
    pp = cfg.parallel.pipeline_model_parallel_size
    return (pp - 1) / (model_chunks(cfg) * cfg.num_microbatches)
