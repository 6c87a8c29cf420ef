"""Packed documents with every parallel layout: loss, grad norm, every gradient and every weight
equal the serial run's (the harness of tests/equivalence.py, fp32 tolerances).

The data is a ``.bin/.idx`` of short documents with EODs (tests/packed_data.py), so every
16-token sample packs several documents: the per-sample position ids and document ids travel
with the micro-batches through TP/SP, PP (and virtual stages: every stage builds its own mask),
DP with the distributed optimizer, CP (ids cut with the load-balanced chunks, then all-gathered
for the keys) and recompute (the mask is an argument of the checkpointed function).
"""
import pytest

from equivalence import assert_equivalent, run_layout, serial
from packed_data import PACKED, packed_argv, write_packed_corpus

LLAMA = ("--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
         "--group-query-attention", "--num-query-groups", "2")


def tp(n):
    return ["--tensor-model-parallel-size", str(n)]


def pp(n):
    return ["--pipeline-model-parallel-size", str(n)]


def cp(n):
    return ["--context-parallel-size", str(n)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    directory = tmp_path_factory.mktemp("packed_layouts")
    return tuple(packed_argv(write_packed_corpus(str(directory)), str(directory / "cache")))


@pytest.mark.parametrize("model", [(), LLAMA], ids=["learned", "rope"])
def test_packed_serial_runs_differ_from_unmasked(base, model):
    """The flags change the run (so the layout tests below compare something), and it learns."""
    ref = serial(tuple(model) + PACKED, base)
    plain = serial(tuple(model), base)
    assert ref["loss"][-1] < ref["loss"][0]
    assert all(abs(a - b) > 1e-4 for a, b in zip(ref["loss"], plain["loss"]))


LAYOUTS = [
    ((), tp(2) + ["--sequence-parallel"], 2),
    ((), pp(2) + ["--num-layers-per-virtual-pipeline-stage", "1"], 2),
    ((), ["--use-distributed-optimizer", "--overlap-grad-reduce", "--ddp-bucket-size", "2000"], 2),
    ((), cp(2), 2),
    (LLAMA, cp(2) + tp(2) + ["--sequence-parallel"], 4),
    (LLAMA + ("--recompute-granularity", "full", "--recompute-method", "uniform"), tp(2) + pp(2), 4),
    (LLAMA + ("--recompute-granularity", "selective"), cp(2) + ["--use-distributed-optimizer"], 4),
]


@pytest.mark.parametrize("model,layout,world", LAYOUTS, ids=[
    "tp2-sp", "pp2-vpp", "dp2-distopt-overlap", "cp2", "rope-cp2-tp2-sp", "rope-tp2-pp2-full-recompute",
    "rope-cp2-dp2-distopt-selective-recompute"])
def test_packed_documents_layouts_match_serial(base, model, layout, world):
    extra = tuple(model) + PACKED
    assert_equivalent(serial(extra, base), run_layout(list(base) + list(extra) + layout, world))
