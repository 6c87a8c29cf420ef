"""TensorBoard / W&B writers, the progress line (tokens/s, MFU, ETA) and the start-up rank table."""
import glob
import importlib.machinery
import importlib.util
import math
import re
import sys
import types

import pytest
import torch

from megalite.training import monitoring
from megalite.config import parse_args
from megalite.data.build import build_datasets
from megalite.planning import model_flops_per_iteration
from megalite.parallel_state import ParallelState, coordinates
from megalite.training import pretrain
from equivalence import TINY, run_layout as train

LOG_RE = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*\| lm loss: ([0-9.E+-]+) \|")
SHORT = TINY + ["--train-iters", "4", "--log-interval", "2", "--eval-interval", "2", "--eval-iters", "1"]


def run_pretrain(argv):
    torch.set_num_threads(1)
    cfg = parse_args(argv)
    datasets, vocab = build_datasets(cfg, log=lambda m: None)
    lines = []
    history = pretrain(cfg, ParallelState.from_sizes(), datasets, vocab, log=lines.append)
    return cfg, history, lines


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_and_progress_lines(tmp_path):
    cfg, history, lines = run_pretrain(SHORT + ["--tensorboard-dir", str(tmp_path)])
    scalars = read_scalars(str(tmp_path))
    steps = [1, 2, 3, 4]
    for tag, key in (("lm loss", "loss"), ("learning-rate", "lr"), ("grad-norm", "grad_norm")):
        assert [s for s, _ in scalars[tag]] == steps
        for (_, value), h in zip(scalars[tag], history):
            assert value == pytest.approx(h[key], rel=1e-6, abs=1e-12), tag
    assert [v for _, v in scalars["loss-scale"]] == [1.0] * 4
    assert [v for _, v in scalars["batch-size"]] == [8.0] * 4
    assert all(v > 0 for _, v in scalars["mem-max-rss-bytes"])
    assert "mfu" not in scalars  # CPU: no known peak, no MFU
    flops = model_flops_per_iteration(cfg.model, 8, 128)  # vocab 100 padded to 128
    for (_, seconds), (_, tflops), (_, tokens) in zip(scalars["iteration-time"], scalars["throughput"],
                                                      scalars["tokens-per-sec"]):
        assert tflops == pytest.approx(flops / (seconds * 1e12), rel=1e-5)
        assert tokens == pytest.approx(8 * 16 / seconds, rel=1e-5)
    # validation: the same numbers as the validation log lines
    val_lines = [line for line in lines if line.startswith(" validation loss at iteration")]
    logged = [float(re.search(r"lm loss value: ([0-9.E+-]+)", line).group(1)) for line in val_lines]
    assert [s for s, _ in scalars["lm loss validation"]] == [2, 4]
    assert [v for _, v in scalars["lm loss validation"]] == pytest.approx(logged, rel=1e-6)
    assert [v for _, v in scalars["lm loss validation ppl"]] == pytest.approx([math.exp(x) for x in logged], rel=1e-5)
    # the contract line is untouched; the progress line follows it on a line of its own
    iteration_idx = [i for i, line in enumerate(lines) if LOG_RE.search(line)]
    assert len(iteration_idx) == 2
    for i in iteration_idx:
        progress = lines[i + 1]
        assert not LOG_RE.search(progress) and "iteration" not in progress
        m = re.fullmatch(r" tokens per second: ([0-9.]+) \| tokens per second per GPU: ([0-9.]+) \| "
                         r"ETA: (\d+):(\d\d):(\d\d) \|", progress)
        assert m, progress
        elapsed_ms = float(re.search(r"elapsed time per iteration \(ms\): ([0-9.]+)", lines[i]).group(1))
        assert float(m.group(1)) == pytest.approx(8 * 16 / (elapsed_ms / 1000), rel=0.01)
        assert float(m.group(2)) == float(m.group(1))  # one process
    assert lines[iteration_idx[-1] + 1].endswith("ETA: 0:00:00 |")  # nothing left after the last one


def test_only_the_logging_rank_writes_events(tmp_path):
    """PP=2: the last stage (rank 1) logs and writes; rank 0 writes no event file."""
    result = train(TINY + ["--train-iters", "3", "--pipeline-model-parallel-size", "2",
                           "--tensorboard-dir", str(tmp_path)], 2)
    assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == 1
    scalars = read_scalars(str(tmp_path))
    assert [v for _, v in scalars["lm loss"]] == pytest.approx(result["loss"], rel=1e-6)


class _FakeRun:
    def __init__(self):
        self.logged, self.finished = [], False

    def log(self, data, step=None):
        self.logged.append((step, dict(data)))

    def finish(self):
        self.finished = True


def _fake_wandb(api_key):
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.api = types.SimpleNamespace(api_key=api_key)
    module.init_calls = []

    def init(**kwargs):
        module.init_calls.append(kwargs)
        module.run = _FakeRun()
        return module.run
    module.init = init
    return module


@pytest.mark.parametrize("api_key,mode", [(None, "offline"), ("0123456789abcdef", None)])
def test_wandb_run_offline_without_api_key(monkeypatch, tmp_path, api_key, mode):
    fake = _fake_wandb(api_key)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    _, history, lines = run_pretrain(SHORT + ["--wandb-project", "megalite-test", "--wandb-exp-name", "tiny",
                                              "--wandb-save-dir", str(tmp_path)])
    (call,) = fake.init_calls
    assert call["mode"] == mode and call["project"] == "megalite-test" and call["name"] == "tiny"
    assert call["dir"] == str(tmp_path) and call["config"]["model.hidden_size"] == 32
    assert any("offline" in line for line in lines) == (mode == "offline")
    per_iteration = [(step, data) for step, data in fake.run.logged if "lm loss" in data]
    assert [step for step, _ in per_iteration] == [1, 2, 3, 4]
    assert [d["lm loss"] for _, d in per_iteration] == pytest.approx([h["loss"] for h in history], rel=1e-12)
    assert [step for step, data in fake.run.logged if "lm loss validation" in data] == [2, 4]
    assert fake.run.finished


def _start(argv, monkeypatch):
    import pretrain_gpt
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return pretrain_gpt.main(argv)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_missing_wandb_fails_at_startup_with_one_clear_message(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        _start(TINY + ["--wandb-project", "p"], monkeypatch)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--wandb-project" in err[0] and "pip install wandb" in err[0]


def test_monitoring_flag_errors(monkeypatch, capsys):
    monkeypatch.setattr(monitoring, "_installed", lambda module: module != "tensorboard")
    with pytest.raises(SystemExit):  # a missing package: checked by the entry point, before any work
        _start(TINY + ["--tensorboard-dir", "x"], monkeypatch)
    assert "--tensorboard-dir needs the tensorboard package" in capsys.readouterr().err
    monkeypatch.setattr(monitoring, "_installed", lambda module: True)
    with pytest.raises(SystemExit):
        parse_args(TINY + ["--wandb-exp-name", "run"])
    assert "need --wandb-project" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(TINY + ["--peak-tflops", "0"])
    assert "--peak-tflops must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA GeForce RTX 4090", None), ("Tesla V100-SXM2-32GB", None), ("", None)])
def test_peak_table(name, peak):
    assert monitoring.peak_tflops_for(name) == peak


def test_mfu_and_eta_in_progress_line():
    cfg = parse_args(TINY + ["--train-iters", "100", "--peak-tflops", "2.5"])
    assert monitoring.device_peak_tflops(torch.device("cpu")) is None
    assert monitoring.device_peak_tflops(torch.device("cpu"), 2.5) == 2.5
    mon = monitoring.TrainingMonitor(cfg, enabled=False, world_size=4, flops_per_iteration=4e12,
                                     model_flops_per_iteration=3e12)
    line = mon.progress_line(40, 2.0)
    # 8 x 16 tokens / 2 s; MFU = 3e12 / (2 s x 4 GPUs) / 2.5e12 = 15%; 60 iterations x 2 s left
    assert line == (" tokens per second: 64.0 | tokens per second per GPU: 16.0 | MFU: 15.0% |"
                    " ETA: 0:02:00 |")
    assert mon.rates(2.0)["throughput"] == pytest.approx(0.5)  # the log line's TFLOP/s/GPU (with recompute)
    assert monitoring.format_eta(90061) == "1 day, 1:01:01"
    assert not mon.writers


def test_rank_table_matches_layout():
    table = monitoring.rank_table(8, tp=2, pp=2, num_layers=4).splitlines()
    assert table[0] == " rank | tp | pp | dp | cp | layers"
    for rank, row in enumerate(table[1:]):
        c = coordinates(rank, 8, tp=2, pp=2)
        cells = [x.strip() for x in row.split("|")]
        assert [int(x) for x in cells[:5]] == [rank, c["tp"], c["pp"], c["dp"], c["cp"]]
        assert cells[5] == ("0-1 + embedding" if c["pp"] == 0 else "2-3 + output layer (tied copy)")
    virtual = monitoring.rank_table(2, pp=2, num_layers=8, layers_per_virtual_stage=2, untied=True)
    assert virtual.splitlines()[2] == "    1 |  0 |  1 |  0 |  0 | 2-3, 6-7 + output layer"


def test_pretrain_gpt_prints_the_rank_table(capsys, monkeypatch):
    assert _start(TINY + ["--train-iters", "1"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert " rank | tp | pp | dp | cp | layers\n    0 |  0 |  0 |  0 |  0 | 0-3 + embedding, output layer\n" in out
    assert re.search(r" tokens per second: [0-9.]+ \| tokens per second per GPU: [0-9.]+ \| ETA: 0:00:00 \|", out)
