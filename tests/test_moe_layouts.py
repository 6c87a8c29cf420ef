"""MoE at every expert layout equals the serial run: loss per iteration, every gradient of
iteration 1 and every weight (the harness of tests/equivalence.py), fp32, with the
load-balancing and z losses on. Layer 0 and 1 are MoE, 2 and 3 dense, so with PP2 the second
stage holds no expert at all (and must still join the expert grad-norm reduction)."""
from __future__ import annotations

import re

import pytest

from equivalence import TINY, assert_equivalent, run_layout, serial

MOE = ("--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "1e-2", "--moe-z-loss-coeff", "1e-3",
       "--moe-layer-freq", "[1,1,0,0]", "--moe-ffn-hidden-size", "64")

LAYOUTS = {  # name: (flags, world size); each dispatcher on several layouts
    "ep2-alltoall": (["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"], 2),
    "ep4-allgather": (["--expert-model-parallel-size", "4"], 4),
    "tp2-sp-ep2-etp1-alltoall": (["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                  "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1",
                                  "--moe-token-dispatcher-type", "alltoall"], 4),
    "tp2-sp-ep2-etp2-allgather": (["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                   "--expert-model-parallel-size", "2"], 4),
    "pp2-ep2-alltoall": (["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                          "--moe-token-dispatcher-type", "alltoall"], 4),
    "ep2-edp2-distopt-overlap": (["--expert-model-parallel-size", "2", "--use-distributed-optimizer",
                                  "--overlap-grad-reduce", "--ddp-bucket-size", "2000"], 4),
    "cp2-ep2-allgather": (["--context-parallel-size", "2", "--expert-model-parallel-size", "2"], 2),
    "pp2-vpp2-ep2-alltoall": (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
                               "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"], 4),
}


def aux_losses(run: dict) -> list[tuple[str, float]]:
    """The load_balancing_loss and z_loss fields of the logged iteration lines."""
    return [(m.group(1), float(m.group(2))) for line in run["lines"]
            for m in re.finditer(r"(load_balancing_loss|z_loss): (\S+)", line)]


def assert_same_aux_losses(ref: dict, got: dict) -> None:
    """The same numbers (to fp32 summation order) at every layout, logged every iteration, not zero."""
    want, have = aux_losses(ref), aux_losses(got)
    assert [n for n, _ in have] == [n for n, _ in want] and len(want) == 2 * len(ref["loss"])
    for (name, a), (_, b) in zip(want, have):
        assert a > 0 and abs(a - b) <= 1e-5 * a, (name, a, b)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_moe_layout_equals_serial(name):
    flags, world = LAYOUTS[name]
    ref = serial(MOE)
    got = run_layout(TINY + list(MOE) + flags, world)
    assert_equivalent(ref, got)
    assert_same_aux_losses(ref, got)  # for one micro-batch size, whatever the layout


@pytest.mark.slow
def test_moe_tp2_pp2_ep2_equals_serial():
    flags = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2",
             "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"]
    ref = serial(MOE)
    got = run_layout(TINY + list(MOE) + flags, 8)
    assert_equivalent(ref, got)
    assert_same_aux_losses(ref, got)


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_moe_capacity_ep2_equals_serial(dispatcher):
    """Token dropping depends on the tokens a rank routes: with EP over data-parallel ranks only,
    each rank routes one micro-batch as the serial run does, so the same pairs are dropped."""
    capacity = MOE + ("--moe-expert-capacity-factor", "0.75")
    got = run_layout(TINY + list(capacity) + ["--expert-model-parallel-size", "2",
                                              "--moe-token-dispatcher-type", dispatcher], 2)
    assert_equivalent(serial(capacity), got)
    assert got["loss"] != serial(MOE)["loss"]  # tokens were dropped


def test_moe_zero_bubble_pp2_ep2_equals_serial():
    """The ZB-H1 schedule with MoE layers: the experts' grads and the aux losses come in B."""
    flags = ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
             "--pipeline-schedule", "zb-h1", "--moe-token-dispatcher-type", "alltoall"]
    got = run_layout(TINY + list(MOE) + flags, 4)
    assert_equivalent(serial(MOE), got)
    assert_same_aux_losses(serial(MOE), got)
