"""Bucketed overlapped DP, the distributed optimizer, mixed precision and loss scaling."""
import math

import pytest
import torch

from distributed_helper import run_distributed
from equivalence import TINY, assert_equivalent, run_layout, serial

DIST_OPT = ["--use-distributed-optimizer"]
OVERLAP = ["--overlap-grad-reduce", "--ddp-bucket-size", "2000"]  # several buckets in the tiny model


@pytest.mark.parametrize("layout,world", [
    (OVERLAP, 2),
    (OVERLAP, 4),
    (DIST_OPT, 2),
    (DIST_OPT + OVERLAP, 4),
    (DIST_OPT + OVERLAP + ["--micro-batch-size", "1"], 2),  # 4 micro-batches of grad accumulation
])
def test_data_parallel_variants_match_serial(layout, world):
    assert_equivalent(serial(), run_layout(TINY + layout, world))


def _state_bytes(rank, world, distributed):
    from megalite.config import parse_args
    from megalite.parallel_state import ParallelState
    from megalite.training import Trainer
    from megalite.data.mock_dataset import MockGPTDataset
    from megalite.training import BatchIterator
    argv = TINY + ["--bf16", "--global-batch-size", str(2 * world)] + (DIST_OPT if distributed else [])
    cfg = parse_args(argv, world_size=world)
    ps = ParallelState.from_sizes()
    trainer = Trainer(cfg, ps, vocab_size=100)
    trainer.train_step(BatchIterator(MockGPTDataset(100, 16, 100), cfg, ps).next_microbatches(cfg.num_microbatches))
    measured = sum(t.numel() * t.element_size() for s in trainer.optimizer.optimizer.state.values()
                   for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    owned = sum(f.end - f.start for f in trainer.optimizer.fragments)
    numel = sum(p.numel() for p in trainer.model[0].parameters())
    return measured, owned, numel, trainer.optimizer.memory_report()


@pytest.mark.parametrize("world", [1, 2, 4])
def test_optimizer_state_bytes_scale_with_dp(world):
    results = run_distributed(_state_bytes, world, True)
    numel = results[0][2]
    assert sum(r[1] for r in results) == numel  # the shards partition the model exactly
    for measured, owned, _, report in results:
        assert measured == 8 * owned  # Adam: two fp32 moments per owned element
        assert report["optimizer_state"] == measured
        assert report["main_params"] == 4 * owned  # fp32 main copies of bf16 params
        per_param = sum(report["per_param"][k] for k in ("params", "grads", "main_params", "optimizer_state"))
        # Megatron's table: 6 + 12 / DP bytes per parameter (bf16 params, fp32 grads); padding of
        # each bucket to a multiple of DP adds a few elements.
        assert per_param == pytest.approx(6 + 12 / world, rel=2e-3)


def test_non_distributed_bf16_is_18_bytes_per_param():
    measured, owned, numel, report = run_distributed(_state_bytes, 1, False)[0]
    assert owned == numel and measured == 8 * numel
    per_param = sum(report["per_param"][k] for k in ("params", "grads", "main_params", "optimizer_state"))
    assert per_param == pytest.approx(18, rel=1e-3)
