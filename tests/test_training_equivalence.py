"""Every tensor x data parallel layout computes the serial model's grads and weights (fp32)."""
import re

import pytest

from equivalence import TINY, assert_equivalent, run_layout, serial

LOG_RE = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*\| lm loss: ([0-9.E+-]+) \|")
TP2 = ["--tensor-model-parallel-size", "2"]


@pytest.mark.parametrize("layout,world", [
    (TP2, 2),
    ([], 2),  # DP=2
    (TP2, 4),  # TP=2 x DP=2
])
def test_tp_dp_layouts_match_serial(layout, world):
    ref = serial()
    assert_equivalent(ref, run_layout(TINY + layout, world))
    assert ref["loss"][-1] < ref["loss"][0]  # and the model does learn


def test_clipping_is_active_and_norm_matches_serial():
    extra = ("--clip-grad", "0.05")  # far below the natural norm: every step is clipped
    ref = serial(extra)
    assert min(ref["grad_norm"]) > 0.05
    assert_equivalent(ref, run_layout(TINY + list(extra) + TP2, 4))
    assert ref["loss"] != serial()["loss"]  # clipping changed the trajectory


def test_log_lines_parse():
    ref = serial()
    parsed = [m for m in map(LOG_RE.search, ref["lines"]) if m]
    assert [int(m.group(1)) for m in parsed] == list(range(1, 7))
    assert all(int(m.group(2)) == 6 for m in parsed)
    assert len(parsed) == len(ref["loss"])
    for m, loss in zip(parsed, ref["loss"]):
        assert float(m.group(3)) == pytest.approx(loss, rel=1e-6)


def _write_datasets(directory) -> list[str]:
    """Two tiny Megatron-format datasets of random token ids < 100 (NullTokenizer, --vocab-size 100)."""
    import numpy as np

    from megalite.data import IndexedDatasetBuilder

    rng, prefixes = np.random.default_rng(0), []
    for name, docs in (("a", 40), ("b", 25)):
        prefix = str(directory / name)
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        for _ in range(docs):
            builder.add_item(rng.integers(0, 100, rng.integers(5, 60)))
            builder.end_document()
        builder.finalize(prefix + ".idx")
        prefixes.append(prefix)
    return prefixes


def test_blended_data_path_through_pretrain(tmp_path):
    """--data-path with weights: the blended dataset, its cache built by rank 0, sampled per DP rank."""
    a, b = _write_datasets(tmp_path)
    data = [flag for flag in TINY if flag != "--mock-data"]
    data += ["--data-path", "0.7", a, "0.3", b, "--tokenizer-type", "NullTokenizer", "--split", "90,10,0",
             "--data-cache-path", str(tmp_path / "cache")]
    ref = run_layout(data, 1)
    assert ref["loss"] != serial()["loss"]  # other data than the mock samples
    assert_equivalent(ref, run_layout(data + TP2, 4))
