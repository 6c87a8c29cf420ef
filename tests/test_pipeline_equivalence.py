"""Pipeline layouts (with TP and DP: full 3D) reproduce the single-process fp32 loss curve."""
import functools

import pytest

from training_helpers import TINY, assert_curves_equal, train

PP = "--pipeline-model-parallel-size"
TP = "--tensor-model-parallel-size"


@functools.lru_cache(maxsize=None)
def serial(extra: tuple = ()) -> dict:
    return train(TINY + list(extra), 1)


@pytest.mark.parametrize("layout,world", [
    ([PP, "2"], 2),
    ([PP, "4"], 4),
    ([TP, "2", PP, "2"], 4),
    ([PP, "2"], 4),  # PP=2 x DP=2
    ([PP, "2", "--pipeline-schedule", "gpipe"], 2),
])
def test_pipeline_layouts_match_serial(layout, world):
    assert_curves_equal(serial(), train(TINY + layout, world))


@pytest.mark.slow
def test_3d_tp2_pp2_dp2_on_8_ranks():
    assert_curves_equal(serial(), train(TINY + [TP, "2", PP, "2"], 8, timeout=400))


def test_untied_embeddings_pp2():
    extra = ("--untie-embeddings-and-output-weights",)
    ref = serial(extra)
    assert ref["loss"] != serial()["loss"]
    assert_curves_equal(ref, train(TINY + list(extra) + [PP, "2"], 2))


def test_fewer_microbatches_than_stages():
    """1F1B with m < p: warmup is capped at m, the schedule still drains correctly."""
    extra = ("--global-batch-size", "2")  # one micro-batch of 2 on 4 stages
    assert_curves_equal(serial(extra), train(TINY + list(extra) + [PP, "4"], 4))
