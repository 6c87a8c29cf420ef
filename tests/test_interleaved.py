"""Interleaved 1F1B (virtual pipeline stages) computes the serial model's grads and weights (fp32)."""
import pytest

from equivalence import TINY, assert_equivalent, run_layout, serial

PP = "--pipeline-model-parallel-size"
VPP = "--num-layers-per-virtual-pipeline-stage"
TP = "--tensor-model-parallel-size"


@pytest.mark.parametrize("extra,layout,world", [
    pytest.param((), [PP, "2", VPP, "1"], 2, id="pp2-v2-m4"),  # warmup, steady 1F1B, cooldown
    pytest.param(("--global-batch-size", "16"), [PP, "2", VPP, "1"], 2, id="pp2-v2-m8"),  # longer steady
    pytest.param(("--num-layers", "8"), [PP, "4", VPP, "1"], 4, id="pp4-v2-m4"),  # m = pp: all F, then all B
    pytest.param(("--num-layers", "8"), [PP, "2", VPP, "2"], 2, id="pp2-v2-2layers"),  # 2 layers per chunk
    pytest.param((), [PP, "2", VPP, "1"], 4, id="pp2-v2-dp2"),  # m = 2 per DP rank
    pytest.param((), [TP, "2", PP, "2", VPP, "1"], 4, id="tp2-pp2-v2"),
])
def test_interleaved_matches_serial(extra, layout, world):
    ref = serial(extra)
    assert_equivalent(ref, run_layout(TINY + list(extra) + layout, world))
    assert ref["loss"][-1] < ref["loss"][0]  # the curve compared is a training curve


@pytest.mark.slow
def test_interleaved_3d_with_everything_on_8_ranks():
    """TP2 x PP2 x DP2, virtual stages, distributed optimizer, overlapped reduction in several
    buckets, sequence parallel, untied output layer: each feature's grads in one run."""
    extra = ("--untie-embeddings-and-output-weights", "--global-batch-size", "16", "--clip-grad", "0.7")
    layout = [TP, "2", PP, "2", VPP, "1", "--use-distributed-optimizer", "--overlap-grad-reduce",
              "--ddp-bucket-size", "2000", "--sequence-parallel"]
    ref = serial(extra)
    assert sum(norm > 0.7 for norm in ref["grad_norm"]) >= 3  # clipped updates are compared too
    assert_equivalent(ref, run_layout(TINY + list(extra) + layout, 8, timeout=400))


def test_interleaved_runs_the_interleaved_schedule():
    from megalite.pipeline_parallel.interleaved import interleaved_one_f_one_b
    from megalite.pipeline_parallel.schedules import get_schedule, one_f_one_b
    assert get_schedule(2, 2) is interleaved_one_f_one_b
    assert get_schedule(2, 1) is one_f_one_b


def test_microbatches_not_multiple_of_pp_is_a_clear_error(capsys):
    from megalite.config import parse_args
    argv = TINY + ["--num-layers", "8", PP, "4", VPP, "1", "--global-batch-size", "6"]  # m = 3
    with pytest.raises(SystemExit):
        parse_args(argv, world_size=4)
    message = capsys.readouterr().err
    assert "micro-batches (3 = global batch / (micro batch x DP))" in message
    assert "multiple of --pipeline-model-parallel-size 4" in message
    assert parse_args(argv[:-2] + ["--global-batch-size", "8"], world_size=4).num_microbatches == 4


def test_schedule_itself_rejects_m_not_multiple_of_pp():
    """Also when called directly (bypassing the start-up check), before any communication."""
    from megalite.parallel_state import ParallelState
    from megalite.pipeline_parallel.interleaved import interleaved_one_f_one_b

    class NoP2P:
        pstate = ParallelState(world_size=4, rank=1, pp_size=4, pp_rank=1, vpp_size=2)

        def communicate(self, **_):
            raise AssertionError("communicated before validating")
    with pytest.raises(ValueError, match=r"micro-batches \(6\) to be a multiple of the pipeline-parallel size \(4\)"):
        interleaved_one_f_one_b(None, [None, None], [{}] * 6, 1.0, NoP2P())


def test_timeline_file_records_the_interleaved_schedule(tmp_path):
    """--timeline-file: every rank writes its events; the last iteration holds m*V forwards and
    backwards per rank, and tools/plot_timeline.py reads the meta for the theoretical bubble."""
    from tools import plot_timeline

    path = str(tmp_path / "tl")
    run_layout(TINY + [PP, "2", VPP, "1", "--train-iters", "2", "--timeline-file", path], 2)
    ranks = plot_timeline.load(path)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["meta"]["pp_rank"] for r in ranks] == [0, 1]
    assert all(r["meta"]["pp_size"] == 2 and r["meta"]["vpp_size"] == 2 and r["meta"]["microbatches"] == 4
               for r in ranks)
    assert all(sum(k == "iteration" for k, _, _ in r["events"]) == 2 for r in ranks)
    last = plot_timeline.select_iteration(ranks)
    for r in last:
        kinds = [k for k, _, _ in r["events"]]
        assert kinds.count("forward") == 8 and kinds.count("backward") == 8 and kinds.count("comm") > 0
    t0, t1, stats = plot_timeline.bubble_fractions(last)
    assert t1 > t0 and all(0.0 <= s["bubble"] < 1.0 for s in stats)
