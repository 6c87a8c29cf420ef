"""Plot training (and validation) loss curves from megalite / Megatron logs or TensorBoard dirs.

    python tools/plot_loss.py tp1.log tp2.log --labels "TP=1" "TP=2" --output loss.png
    python tools/plot_loss.py runs/tb_tp1 runs/tb_tp2 --output loss.png    # --tensorboard-dir's

A log is read line by line: iteration lines (docs/architecture.md, "Formats") give the training loss,
``validation loss at iteration N | lm loss value: X |`` lines the validation loss. A directory
is read as TensorBoard events (scalars ``lm loss`` and ``lm loss validation``).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

ITERATION_RE = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*\| lm loss: ([0-9.E+-]+) \|")
VALIDATION_RE = re.compile(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.E+-]+) \|")


def parse_log(lines) -> dict[str, list[tuple[int, float]]]:
    """``{"train": [(iteration, loss)], "validation": [(iteration, loss)]}`` from log lines."""
    series: dict[str, list[tuple[int, float]]] = {"train": [], "validation": []}
    for line in lines:
        if m := ITERATION_RE.search(line):
            series["train"].append((int(m.group(1)), float(m.group(3))))
        elif m := VALIDATION_RE.search(line):
            series["validation"].append((int(m.group(1)), float(m.group(2))))
    return series


def read_tensorboard(path: str) -> dict[str, list[tuple[int, float]]]:
    """The same series from the event files of a ``--tensorboard-dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(path, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    return {key: [(e.step, e.value) for e in acc.Scalars(tag)] if tag in tags else []
            for key, tag in (("train", "lm loss"), ("validation", "lm loss validation"))}


def read_series(path: str) -> dict[str, list[tuple[int, float]]]:
    if os.path.isdir(path):
        return read_tensorboard(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_log(f)


def relative_difference(reference: list[tuple[int, float]], other: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """``(iteration, other / reference - 1)`` at the iterations both runs logged."""
    ref = dict(reference)
    return [(it, value / ref[it] - 1.0) for it, value in other if it in ref and ref[it] != 0]


def plot(runs: list[tuple[str, dict]], output: str, title: str | None = None, log_scale: bool = False) -> None:
    """Draw each run's training curve (line) and validation points (markers) into ``output``;
    with several runs, a lower panel shows each one's relative difference to the first."""
    import matplotlib  # lazy: only the plotting needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diffs = [(label, relative_difference(runs[0][1]["train"], series["train"])) for label, series in runs[1:]]
    diffs = [(label, d) for label, d in diffs if d]
    if diffs:
        fig, (ax, dax) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, series) in enumerate(runs):
        color, width = f"C{i % 10}", max(1.0, 2.5 - 0.6 * i)  # later runs thinner: equal curves stay visible
        if series["train"]:
            x, y = zip(*series["train"])
            ax.plot(x, y, color=color, linewidth=width, label=f"{label} (train)")
        if series["validation"]:
            x, y = zip(*series["validation"])
            ax.plot(x, y, "o--", color=color, label=f"{label} (validation)")
    if diffs:
        for i, (label, d) in enumerate(diffs, start=1):
            x, y = zip(*d)
            dax.plot(x, y, color=f"C{i % 10}", label=f"{label} / {runs[0][0]} - 1")
        dax.set_xlabel("iteration")
        dax.set_ylabel("relative difference")
        dax.grid(True, alpha=0.3)
        dax.legend()
    else:
        ax.set_ylabel("lm loss")
    if log_scale:
        ax.set_yscale("log")
    ax.set_title(title or "lm loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", help="log files or TensorBoard directories")
    parser.add_argument("--output", "-o", default="loss.png", help="PNG to write (default: loss.png)")
    parser.add_argument("--labels", nargs="+", help="one label per input (default: file names)")
    parser.add_argument("--title", help="plot title")
    parser.add_argument("--log-scale", action="store_true", help="logarithmic loss axis")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.inputs):
        parser.error(f"--labels has {len(args.labels)} entries for {len(args.inputs)} inputs")
    labels = args.labels or [os.path.basename(os.path.normpath(p)) for p in args.inputs]
    runs = []
    for label, path in zip(labels, args.inputs):
        series = read_series(path)
        if not series["train"] and not series["validation"]:
            print(f"plot_loss.py: no loss values found in {path}", file=sys.stderr)
            return 1
        runs.append((label, series))
        print(f"{label}: {len(series['train'])} training points, {len(series['validation'])} validation points")
    plot(runs, args.output, args.title, args.log_scale)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
