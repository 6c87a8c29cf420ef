"""Smoke tests of the benchmark scripts (no timing assertions: the numbers depend on the machine)."""
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import step_time  # noqa: E402


def test_megalite_and_plain_pytorch_reference_train_identically():
    """Same weights, same batches, same AdamW: the plain GPT reproduces megalite's losses, which
    is what makes step_time.py's ratio a like-for-like comparison."""
    pairs = step_time.compare_losses(step_time.CONFIGS["tiny"], steps=2, microbatches=2)
    assert len(pairs) == 2
    for megalite_loss, reference_loss in pairs:
        assert megalite_loss == pytest.approx(reference_loss, rel=1e-5)
    assert pairs[0][0] != pairs[1][0]  # a real update happened in between


def test_time_runners_interleaves_and_counts():
    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def step(self, batches):
            calls.append(self.name)
            return 0.0

    times = step_time.time_runners([Fake("a"), Fake("b")], [], reps=2, iters=2, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4}
    # round 1: warmup a, b, then a b a b; round 2 (order flipped): warmup b, a, then b a b a
    assert calls == ["a", "b", "a", "b", "a", "b", "b", "a", "b", "a", "b", "a"]


def test_gpu_step_skips_cleanly_without_cuda(capsys):
    import torch

    import gpu_step
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the skip path is not taken")
    assert gpu_step.main([]) == 0
    assert "CUDA is not available" in capsys.readouterr().out


def _big_result(rank, world):
    return {"rank": rank, "events": [(rank, float(i), float(i + 1)) for i in range(20000)]}  # ~1 MB pickled


def _fails_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("rank 1 refuses")
    return rank


@pytest.mark.timeout(120)
def test_scaling_launch_returns_results_larger_than_a_pipe_buffer():
    """scaling.py's launcher must read the ranks' results before joining them: a result larger
    than the pipe buffer (as the 8-rank layout's collective events are) used to deadlock."""
    import scaling
    results = scaling.launch(_big_result, 2)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(len(r["events"]) == 20000 and r["events"][-1][0] == r["rank"] for r in results)


@pytest.mark.timeout(120)
def test_scaling_launch_reports_the_failing_rank():
    import scaling
    with pytest.raises(RuntimeError, match=r"rank 1 failed:(.|\n)*rank 1 refuses"):
        scaling.launch(_fails_on_rank_1, 1 + 1)


def test_moe_reference_layer_equals_megalite_moe_layer():
    """benchmarks/moe.py's plain PyTorch MoE, given megalite's weights, computes megalite's
    MoELayer: same output and input grad (what makes its ratio like-for-like)."""
    import argparse

    import moe
    config = argparse.Namespace(hidden=16, ffn=24, experts=4, topk=2, seq=6, mb=2)
    mega, ref = moe.layer_pair(config)
    (out, grad), (ref_out, ref_grad) = mega.step(), ref.step()
    assert out.abs().max() > 0
    assert (out - ref_out).abs().max() < 1e-5 and (grad - ref_grad).abs().max() < 1e-5
