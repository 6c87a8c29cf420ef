"""Bucketed overlapped DP, the distributed optimizer, mixed precision and loss scaling."""
import functools
import math

import pytest
import torch

from distributed_helper import run_distributed
from training_helpers import TINY, assert_curves_equal, train

DIST_OPT = ["--use-distributed-optimizer"]
OVERLAP = ["--overlap-grad-reduce", "--ddp-bucket-size", "2000"]  # several buckets in the tiny model


@functools.lru_cache(maxsize=None)
def serial(extra: tuple = ()) -> dict:
    return train(TINY + list(extra), 1)


@pytest.mark.parametrize("layout,world", [
    (OVERLAP, 2),
    (OVERLAP, 4),
    (DIST_OPT, 2),
    (DIST_OPT + OVERLAP, 4),
    (DIST_OPT + OVERLAP + ["--micro-batch-size", "1"], 2),  # 4 micro-batches of grad accumulation
])
def test_data_parallel_variants_match_serial(layout, world):
    assert_curves_equal(serial(), train(TINY + layout, world))


@pytest.mark.slow
def test_distributed_optimizer_3d():
    layout = DIST_OPT + OVERLAP + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    ref = serial()
    assert sum(norm > 1.0 for norm in ref["grad_norm"]) >= 3  # TINY's --clip-grad 1.0 clips: compared too
    assert_curves_equal(ref, train(TINY + layout, 8, timeout=400))  # grad norm: TP x PP x DP shards


def test_bf16_stays_close_to_fp32():
    extra = ("--train-iters", "20")
    ref, got = serial(extra), train(TINY + list(extra) + ["--bf16"], 2)
    for i, (a, b) in enumerate(zip(ref["loss"], got["loss"])):
        assert abs(a - b) <= 0.02 * a, f"iteration {i + 1}: bf16 loss {b} vs fp32 {a}"
    assert got["loss"] != ref["loss"]  # it really ran in bf16


def _tiny_trainer(argv, world=1):
    from megalite.config import parse_args
    from megalite.parallel_state import ParallelState
    from megalite.training import Trainer
    cfg = parse_args(TINY + argv, world_size=world)
    return Trainer(cfg, ParallelState.from_sizes(), vocab_size=100)


def test_fp16_dynamic_loss_scaling_skips_inf_and_recovers():
    from megalite.data.mock_dataset import MockGPTDataset
    from megalite.training import BatchIterator
    trainer = _tiny_trainer(["--fp16", "--initial-loss-scale", "1024"])
    trainer.optimizer.scaler.hysteresis_left = 1  # back off at the first overflow
    batches = BatchIterator(MockGPTDataset(200, 16, 100), trainer.cfg, trainer.pstate)
    params_before = [p.detach().clone() for p in trainer.model[0].parameters()]
    first = trainer.model[0].layers[0].mlp.fc1.weight
    hook = first.register_hook(lambda g: torch.full_like(g, math.inf))  # inject an overflow
    stats = trainer.train_step(batches.next_microbatches(trainer.cfg.num_microbatches))
    hook.remove()
    assert not stats["updated"] and trainer.skipped_iterations == 1
    assert trainer.optimizer.scaler.scale == 512.0  # backed off
    for before, p in zip(params_before, trainer.model[0].parameters()):
        assert torch.equal(before, p)  # a skipped step changes nothing
    stats = trainer.train_step(batches.next_microbatches(trainer.cfg.num_microbatches))
    assert stats["updated"] and math.isfinite(stats["grad_norm"]) and math.isfinite(stats["loss"])
    assert any(not torch.equal(b, p) for b, p in zip(params_before, trainer.model[0].parameters()))


def test_dynamic_scaler_grows_after_window():
    from megalite.optimizer.loss_scaler import DynamicLossScaler
    s = DynamicLossScaler(8.0, window=3, hysteresis=2)
    s.update(True)
    assert s.scale == 8.0  # hysteresis: the first overflow is tolerated
    s.update(True)
    assert s.scale == 4.0
    for _ in range(3):
        s.update(False)
    assert s.scale == 8.0


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
