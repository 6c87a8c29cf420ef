"""The learning-rate schedule equals megatron-core's OptimizerParamScheduler, step by step, and
the trainer applies it as Megatron does: iteration i trains with the lr after the successful
updates before it, a skipped update does not advance it, and a resumed run continues it."""
import functools
import itertools
import warnings
from types import SimpleNamespace

import pytest

from equivalence import TINY, inject_grad, iteration_lines, run_layout

GBS = 8  # Megatron counts the schedule in samples: steps = iterations x global batch size


def megatron_lrs(iterations: int, *, lr: float, min_lr: float, warmup: int, decay: int, style: str,
                 wsd_decay: int | None = None, wsd_style: str = "exponential", skipped=()) -> list[float]:
    """The lr megatron-core applies in iterations 1..``iterations`` (its train step advances the
    scheduler by the global batch after a successful update only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    optimizer = SimpleNamespace(param_groups=[{}])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=lr, min_lr=min_lr, lr_warmup_steps=warmup * GBS,
        lr_decay_steps=decay * GBS, lr_decay_style=style, start_wd=0.01, end_wd=0.01,
        wd_incr_steps=decay * GBS, wd_incr_style="constant",
        wsd_decay_steps=None if wsd_decay is None else wsd_decay * GBS, lr_wsd_decay_style=wsd_style)
    lrs = []
    for iteration in range(1, iterations + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        if iteration not in skipped:
            scheduler.step(increment=GBS)
    return lrs


CASES = [  # (style, warmup, decay iters, wsd decay iters, wsd style, min lr)
    *[(style, warmup, 40, None, "exponential", min_lr) for style, warmup, min_lr in
      itertools.product(["constant", "linear", "cosine"], [0, 1, 7], [0.0, 3e-5])],
    *[("WSD", warmup, 40, wsd, wsd_style, 1e-5) for warmup, wsd, wsd_style in
      itertools.product([0, 5], [1, 10, 35], ["exponential", "linear", "cosine", "minus_sqrt"])],
]


@pytest.mark.parametrize("style,warmup,decay,wsd_decay,wsd_style,min_lr", CASES)
def test_schedule_equals_megatron_core(style, warmup, decay, wsd_decay, wsd_style, min_lr):
    from megalite.optimizer.lr_scheduler import LRScheduler

    ours = LRScheduler(1e-3, min_lr, warmup, decay, style, wsd_decay, wsd_style)
    got = [ours.lr(step) for step in range(decay + 10)]  # past the end of decay too
    want = megatron_lrs(decay + 10, lr=1e-3, min_lr=min_lr, warmup=warmup, decay=decay, style=style,
                        wsd_decay=wsd_decay, wsd_style=wsd_style)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_wsd_default_decay_is_ten_percent_and_flags_reach_the_scheduler():
    from megalite.config import parse_args
    from megalite.optimizer.lr_scheduler import LRScheduler

    cfg = parse_args(TINY + ["--lr-decay-style", "WSD", "--train-iters", "50", "--lr-warmup-iters", "10",
                             "--lr-wsd-decay-style", "cosine"])
    assert cfg.training.lr_decay_iters == 50 and cfg.training.lr_wsd_decay_style == "cosine"
    assert LRScheduler(1.0, 0.0, 10, 50, "WSD").wsd_decay_steps == 4  # (50 - 10) / 10
    with pytest.raises(SystemExit):
        parse_args(TINY + ["--lr-wsd-decay-style", "square"])


@functools.lru_cache(maxsize=None)
def _run(flags: tuple, inject=None) -> dict:
    return run_layout(TINY + list(flags), 1, inject=inject)


SCHEDULE = ("--train-iters", "12", "--lr-warmup-iters", "3", "--lr-decay-iters", "10", "--lr-decay-style", "WSD",
            "--lr-wsd-decay-iters", "4", "--min-lr", "1e-4", "--lr", "3e-3")


def test_trainer_applies_megatron_lrs_and_a_skipped_update_does_not_advance_them():
    got = _run(SCHEDULE, functools.partial(inject_grad, iteration=5, on_rank=0))  # iteration 5: inf grad
    assert [h["updated"] for h in got["per_rank"][0]["history"]] == [i != 5 for i in range(1, 13)]
    want = megatron_lrs(12, lr=3e-3, min_lr=1e-4, warmup=3, decay=10, style="WSD", wsd_decay=4,
                        wsd_style="exponential", skipped={5})
    assert got["lr"] == pytest.approx(want, rel=1e-12, abs=0)
    assert got["lr"][4] == got["lr"][5]  # the skipped iteration 5 did not advance the schedule
    assert "learning rate: 0.000000E+00" in iteration_lines(got)[0]  # warmup: iteration 1 trains with lr 0


@pytest.mark.parametrize("stop", [2, 8], ids=["mid-warmup", "mid-decay"])
def test_resume_continues_the_schedule(tmp_path, stop):
    save = str(tmp_path / "ckpt")
    straight = _run(SCHEDULE)
    first = run_layout(TINY + list(SCHEDULE) + ["--save", save, "--exit-interval", str(stop)], 1)
    second = run_layout(TINY + list(SCHEDULE) + ["--load", save], 1)
    assert len(first["lr"]) == stop and len(second["lr"]) == 12 - stop
    assert first["lr"] + second["lr"] == straight["lr"]
    assert first["loss"] + second["loss"] == straight["loss"]
