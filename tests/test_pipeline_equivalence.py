"""Pipeline layouts (with TP and DP: full 3D) compute the serial model's grads and weights (fp32)."""
import pytest

from equivalence import TINY, assert_equivalent, run_layout, serial

PP = "--pipeline-model-parallel-size"
TP = "--tensor-model-parallel-size"


@pytest.mark.parametrize("layout,world", [
    ([PP, "2"], 2),
    ([PP, "4"], 4),
    ([TP, "2", PP, "2"], 4),
    ([PP, "2"], 4),  # PP=2 x DP=2
    ([PP, "2", "--pipeline-schedule", "gpipe"], 2),
])
def test_pipeline_layouts_match_serial(layout, world):
    assert_equivalent(serial(), run_layout(TINY + layout, world))


def test_untied_embeddings_pp2():
    extra = ("--untie-embeddings-and-output-weights",)
    ref = serial(extra)
    assert ref["loss"] != serial()["loss"]
    assert "output_layer.weight" in ref["params"]
    assert_equivalent(ref, run_layout(TINY + list(extra) + [PP, "2"], 2))


def test_fewer_microbatches_than_stages():
    """1F1B with m < p: warmup is capped at m, the schedule still drains correctly."""
    extra = ("--global-batch-size", "2")  # one micro-batch of 2 on 4 stages
    assert_equivalent(serial(extra), run_layout(TINY + list(extra) + [PP, "4"], 4))


def test_selective_recompute_under_pp():
    extra = ("--recompute-granularity", "selective")
    assert_equivalent(serial(), run_layout(TINY + list(extra) + [TP, "2", PP, "2"], 4))


def test_full_recompute_under_tp_pp():
    extra = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    assert_equivalent(serial(), run_layout(TINY + extra + [TP, "2", PP, "2"], 4))
