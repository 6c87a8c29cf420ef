"""bf16 and fp16 against fp32: curves and grads within stated tolerances, overflow skips agreed
by every rank, loss scaling (dynamic and constant) undone before anything reads the grads, and
the loss scaler's state carried exactly through a checkpoint."""
import functools

import pytest

from equivalence import BF16, FP16, TINY, assert_equivalent, inject_grad, iteration_lines, run_layout, serial

TP = "--tensor-model-parallel-size"
PP = "--pipeline-model-parallel-size"
# An inf grad in iteration 3 on one rank: fp32 skips it as a non-finite step, fp16 as an overflow.
INF_AT_3 = functools.partial(inject_grad, iteration=3, on_rank=0)


@functools.lru_cache(maxsize=None)
def fp32_with_inf_at_3() -> dict:
    return run_layout(TINY, 1, inject=INF_AT_3)


def test_bf16_matches_fp32_within_tolerance():
    ref, got = serial(), run_layout(TINY + ["--bf16", TP, "2"], 2)
    assert_equivalent(ref, got, BF16)
    assert got["loss"] != ref["loss"]  # it really ran in bf16


@pytest.mark.slow
def test_fp16_3d_distributed_optimizer_matches_fp32_and_every_rank_skips_the_overflow():
    """TP2 x PP2 x DP2, distributed optimizer: an inf on one rank's grad skips the step on all
    8 ranks (the gather checks every rank's skip decisions and grad norms agree), the scaler
    state is the same everywhere, and loss, grad norms and grads stay within FP16 of fp32 (a
    missing unscale would leave the grads x1024)."""
    inject = functools.partial(inject_grad, iteration=3, on_rank=5, name="layers.3.mlp.fc1.weight")
    got = run_layout(TINY + ["--fp16", "--initial-loss-scale", "1024", TP, "2", PP, "2",
                             "--use-distributed-optimizer"], 8, inject=inject, timeout=400)
    assert_equivalent(fp32_with_inf_at_3(), got, FP16)
    assert [h["updated"] for h in got["per_rank"][5]["history"]] == [True, True, False, True, True, True]
    scalers = [r["scaler"] for r in got["per_rank"]]
    assert all(s == scalers[0] for s in scalers)
    assert scalers[0] == {"scale": 1024.0, "hysteresis_left": 1, "clean_steps": 3}  # hysteresis 2: no back-off yet
    assert "number of skipped iterations:   1 | number of nan iterations:   0 |" in iteration_lines(got)[-1]


def test_fp16_constant_loss_scale_matches_fp32():
    """--loss-scale: a constant scale, unscaled before clipping; an inf grad is then a non-finite
    step (there is no scaler to back off), skipped and counted as a nan iteration."""
    got = run_layout(TINY + ["--fp16", "--loss-scale", "1024", TP, "2"], 2, inject=INF_AT_3)
    assert_equivalent(fp32_with_inf_at_3(), got, FP16)
    assert all(r["scaler"] == {"scale": 1024.0} for r in got["per_rank"])
    assert "number of skipped iterations:   1 | number of nan iterations:   1 |" in iteration_lines(got)[-1]


def test_unscaled_grads_are_what_the_optimizer_sees():
    """Dynamic scaling at 2**14: the captured grads (after unscaling, before clipping) and grad
    norms equal fp32's, so a missing or doubled unscale cannot pass."""
    got = run_layout(TINY + ["--fp16", "--initial-loss-scale", str(2 ** 14)], 1)
    assert got["per_rank"][0]["scaler"]["scale"] == 2 ** 14
    assert_equivalent(serial(), got, FP16)


def test_loss_scaler_state_resumes_exactly(tmp_path):
    """A dynamic scaler mid-hysteresis (an overflow at iteration 2) saved at iteration 3 and
    resumed gives the uninterrupted run's losses, scaler state and weights, bit for bit."""
    flags = TINY + ["--fp16", "--initial-loss-scale", "1024"]
    inject = functools.partial(inject_grad, iteration=2, on_rank=0)
    straight = run_layout(flags, 2, inject=inject)
    save = str(tmp_path / "ckpt")
    first = run_layout(flags + ["--save", save, "--exit-interval", "3"], 2, inject=inject)
    assert first["per_rank"][0]["scaler"] == {"scale": 1024.0, "hysteresis_left": 1, "clean_steps": 1}
    second = run_layout(flags + ["--load", save], 2)
    assert len(first["loss"]) == 3 and len(second["loss"]) == 3
    assert first["loss"] + second["loss"] == straight["loss"]
    assert second["per_rank"][0]["scaler"] == straight["per_rank"][0]["scaler"]
    for name, value in straight["params"].items():
        assert (second["params"][name] == value).all(), name


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
