"""Every tensor x data parallel layout reproduces the single-process fp32 loss curve."""
import functools
import re

import pytest

from training_helpers import TINY, assert_curves_equal, train

LOG_RE = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*\| lm loss: ([0-9.E+-]+) \|")


@functools.lru_cache(maxsize=None)
def serial(extra: tuple = ()) -> dict:
    return train(TINY + list(extra), 1)


@pytest.mark.parametrize("layout,world", [
    (["--tensor-model-parallel-size", "2"], 2),
    ([], 2),  # DP=2
    (["--tensor-model-parallel-size", "2"], 4),  # TP=2 x DP=2
])
def test_tp_dp_layouts_match_serial(layout, world):
    got = train(TINY + layout, world)
    ref = serial()
    assert_curves_equal(ref, got)
    assert ref["loss"][-1] < ref["loss"][0]  # and the model does learn


def test_clipping_is_active_and_norm_matches_serial():
    extra = ("--clip-grad", "0.05")  # far below the natural norm: every step is clipped
    ref = serial(extra)
    assert min(ref["grad_norm"]) > 0.05
    got = train(TINY + list(extra) + ["--tensor-model-parallel-size", "2"], 4)
    assert_curves_equal(ref, got)
    assert ref["loss"] != serial()["loss"]  # clipping changed the trajectory


def test_log_lines_parse():
    ref = serial()
    parsed = [LOG_RE.search(line) for line in ref["lines"]]
    parsed = [m for m in parsed if m]
    assert [int(m.group(1)) for m in parsed] == list(range(1, 11))
    assert all(int(m.group(2)) == 10 for m in parsed)
    for m, loss in zip(parsed, ref["loss"]):
        assert float(m.group(3)) == pytest.approx(loss, rel=1e-6)
