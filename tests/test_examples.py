"""The examples users copy from run and keep their promises."""
import os
import sys

import pytest

from distributed_helper import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))


def _custom_model(rank, world):
    import custom_model
    return custom_model.train(steps=20)


@pytest.mark.parametrize("tp", [2, 4])
def test_custom_model_is_tp_invariant_and_learns(tp):
    serial = run_distributed(_custom_model, 1)[0]
    parallel = run_distributed(_custom_model, tp)
    assert serial[-1] < 0.5 * serial[0]  # it learns the stride-3 sequences
    for losses in parallel:  # every TP rank sees the serial loss curve
        assert losses == pytest.approx(serial, rel=1e-5)
