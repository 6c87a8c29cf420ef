"""tools/plot_loss.py: parse generated logs and TensorBoard dirs, draw a PNG."""
import math

import pytest

from megalite.training.log_line import format_iteration_line, format_validation_line
from tools import plot_loss

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_log(path, losses, validation, noise=True):
    """A log as pretrain prints it (start-up noise, iteration, progress and validation lines)."""
    lines = []
    if noise:
        lines = ["megalite: world size 2 = TP 2 x PP 1 x CP 1 x DP 1", " rank | tp | pp | dp | cp | layers"]
    for it, loss in enumerate(losses, start=1):
        lines.append(format_iteration_line(it, len(losses), 8 * it, 12.5, 0.1, 3e-4, 8, loss, 1.0, 0.5, 0, 0))
        lines.append(" tokens per second: 1000.0 | tokens per second per GPU: 500.0 | ETA: 0:00:01 |")
        if it in validation:
            lines.append(format_validation_line(f"iteration {it}", validation[it]))
    path.write_text("\n".join(lines) + "\n")


def expected(values):
    return [float(f"{v:.6E}") for v in values]  # what %E keeps


def test_parse_and_plot_two_logs(tmp_path, capsys):
    tp1 = [5.5 * math.exp(-0.1 * i) + 0.01 * i for i in range(20)]
    tp2 = [x * (1 + 1e-7) for x in tp1]
    make_log(tmp_path / "tp1.log", tp1, {10: 4.0, 20: 3.5})
    make_log(tmp_path / "tp2.log", tp2, {10: 4.0000001, 20: 3.5})
    series = plot_loss.read_series(str(tmp_path / "tp1.log"))
    assert [i for i, _ in series["train"]] == list(range(1, 21))
    assert [v for _, v in series["train"]] == expected(tp1)
    assert series["validation"] == [(10, 4.0), (20, 3.5)]
    diff = plot_loss.relative_difference(series["train"], plot_loss.read_series(str(tmp_path / "tp2.log"))["train"])
    assert [i for i, _ in diff] == list(range(1, 21)) and max(abs(d) for _, d in diff) < 1e-6
    out = tmp_path / "loss.png"
    assert plot_loss.main([str(tmp_path / "tp1.log"), str(tmp_path / "tp2.log"), "--labels", "TP=1", "TP=2",
                           "--output", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert "TP=1: 20 training points, 2 validation points" in capsys.readouterr().out


def test_tensorboard_dir_input(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    losses = [4.0, 3.5, 3.25, 3.125]
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        for step, loss in enumerate(losses, start=1):
            writer.add_scalar("lm loss", loss, step)
        writer.add_scalar("lm loss validation", 3.0, 4)
    series = plot_loss.read_series(str(tmp_path / "tb"))
    assert series == {"train": list(enumerate(losses, start=1)), "validation": [(4, 3.0)]}
    out = tmp_path / "tb.png"
    assert plot_loss.main([str(tmp_path / "tb"), "--output", str(out), "--log-scale"]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_errors(tmp_path, capsys):
    (tmp_path / "empty.log").write_text("nothing to see\n")
    assert plot_loss.main([str(tmp_path / "empty.log"), "--output", str(tmp_path / "x.png")]) == 1
    assert "no loss values" in capsys.readouterr().err
    make_log(tmp_path / "a.log", [1.0, 0.5], {})
    with pytest.raises(SystemExit):
        plot_loss.main([str(tmp_path / "a.log"), "--labels", "a", "b"])


def test_log_line_shows_small_throughput():
    """A CPU's TFLOP/s (0.0012) must not print as 0.0; from 1 up one decimal, as Megatron."""
    line = lambda tflops: format_iteration_line(1, 10, 8, 12.5, tflops, 1e-3, 8, 4.5, 1.0, 0.5, 0, 0)  # noqa: E731
    assert "(TFLOP/s/GPU): 0.0012 |" in line(0.00123)
    assert "(TFLOP/s/GPU): 0.40 |" in line(0.4)
    assert "(TFLOP/s/GPU): 512.3 |" in line(512.34)
    assert "(TFLOP/s/GPU): 0.0 |" in line(0.0)
