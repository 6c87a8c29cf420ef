"""Plot a pipeline timeline recorded with ``--timeline-file PATH`` and measure its bubble.

    python tools/plot_timeline.py PATH [--output timeline.png] [--iteration -1] [--pp P --microbatches M --vpp V]

Reads every ``PATH.rank{N}.json`` (``(kind, start, end)`` events; kinds ``forward``,
``backward``, ``weight`` (ZB-H1's W; there ``backward`` is B, the input grad), ``comm``,
``iteration``), puts them on one time axis (the files carry their
``perf_counter`` origin, shared by the processes of one machine), keeps one iteration (the last
by default: the first ones include warm-up effects), draws one row per rank as a PNG and prints
the bubble of each rank.

Bubble, as measured here: the iteration's *pipeline span* runs from the first forward that
starts on any rank to the last backward (or W) that ends on any rank (one flush of the
pipeline). A rank's bubble is the part of that span in which it runs no forward, backward or W:
``1 - (forward + backward + weight time) / span``. Time in p2p calls counts as bubble (on CPU it is
mostly waiting for the neighbour). The theory for equal-cost stages and free communication is
``(p - 1) / (V*m + p - 1)`` of the span (p stages, m micro-batches, V virtual stages per rank;
``(p - 1) / (m + p - 1)`` for plain 1F1B); Megatron's papers quote the same bubble relative to
the ideal time instead, ``(p - 1) / (V*m)``. p, m and V come from the files' ``meta`` (saved by
the trainer) unless given as options. A timeline with W events is ZB-H1's: its theory,
``(p - 1)(F + B - W) / (m (F + B + W) + (p - 1)(F + B - W))``, takes the measured mean F, B and
W times ((p - 1) / (3m + p - 1) when they are equal).
"""
from __future__ import annotations

import argparse
import glob
import json
import re
import sys

COMPUTE = ("forward", "backward", "weight")
COLOURS = {"forward": "#4C72B0", "backward": "#DD8452", "weight": "#55A868", "comm": "#9A9A9A"}
LABELS = {"forward": "forward (F)", "backward": "backward (B)", "weight": "weight grads (W)", "comm": "comm"}


def load(path: str) -> list[dict]:
    """All ranks' files of ``path``, sorted by rank, with event times on one shared axis."""
    files = sorted(glob.glob(f"{glob.escape(path)}.rank*.json"),
                   key=lambda f: int(re.search(r"\.rank(\d+)\.json$", f).group(1)))
    if not files:
        raise SystemExit(f"no timeline files {path}.rank*.json (run training with --timeline-file {path})")
    ranks = []
    for name in files:
        with open(name) as f:
            data = json.load(f)
        origin = data.get("origin", 0.0)
        data["events"] = [(kind, origin + start, origin + end) for kind, start, end in data["events"]]
        ranks.append(data)
    return ranks


def select_iteration(ranks: list[dict], iteration: int = -1) -> list[dict]:
    """Keep the events inside each rank's ``iteration``-th iteration span (all events if the
    files have no iteration marks)."""
    selected = []
    for data in ranks:
        spans = [(s, e) for kind, s, e in data["events"] if kind == "iteration"]
        events = [ev for ev in data["events"] if ev[0] != "iteration"]
        if spans:
            start, end = spans[iteration]
            events = [ev for ev in events if start <= ev[1] and ev[2] <= end]
        selected.append({**data, "events": events})
    return selected


def bubble_fractions(ranks: list[dict]) -> tuple[float, float, list[dict]]:
    """``(span_start, span_end, per-rank stats)``; stats: rank, busy, comm, bubble (see module doc)."""
    compute = [ev for data in ranks for ev in data["events"] if ev[0] in COMPUTE]
    if not compute:
        raise SystemExit("no forward/backward events in the selected iteration")
    t0 = min(s for _, s, _ in compute)
    t1 = max(e for _, _, e in compute)
    span = t1 - t0
    stats = []
    for data in ranks:
        busy = sum(e - s for kind, s, e in data["events"] if kind in COMPUTE)
        comm = sum(e - s for kind, s, e in data["events"] if kind == "comm")
        stats.append({"rank": data["rank"], "busy": busy, "comm": comm, "bubble": 1.0 - busy / span})
    return t0, t1, stats


def theory(pp: int, microbatches: int, vpp: int = 1) -> float:
    """Bubble as a fraction of the pipeline span for equal stages and free communication."""
    return (pp - 1) / (vpp * microbatches + pp - 1)


def theory_zero_bubble(pp: int, microbatches: int, f: float, b: float, w: float) -> float:
    """ZB-H1's bubble as a fraction of the span: each rank idles (p-1)(F+B-W) (at least 0)."""
    idle = (pp - 1) * max(f + b - w, 0.0)
    return idle / (microbatches * (f + b + w) + idle)


def mean_durations(ranks: list[dict]) -> dict[str, float]:
    """Mean duration of each kind of compute event over all ranks (the kinds that occur)."""
    out = {}
    for kind in COMPUTE:
        spans = [e - s for data in ranks for k, s, e in data["events"] if k == kind]
        if spans:
            out[kind] = sum(spans) / len(spans)
    return out


def plot(ranks: list[dict], t0: float, t1: float, output: str, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install matplotlib "
                         "(the bubble numbers above do not)") from None
    fig, ax = plt.subplots(figsize=(12, 0.55 * len(ranks) + 1.3))
    for row, data in enumerate(ranks):
        for kind in ("comm",) + COMPUTE:
            bars = [((s - t0) * 1e3, (e - s) * 1e3) for k, s, e in data["events"] if k == kind]
            height = 0.35 if kind == "comm" else 0.7
            ax.broken_barh(bars, (row - height / 2, height), facecolors=COLOURS[kind],
                           edgecolor="white" if kind != "comm" else "none", linewidth=0.5)
    labels = []
    for data in ranks:
        meta = data.get("meta", {})
        stage = f" (pp {meta['pp_rank']})" if "pp_rank" in meta else ""
        labels.append(f"rank {data['rank']}{stage}")
    ax.set_yticks(range(len(ranks)), labels)
    ax.invert_yaxis()
    ax.set_xlim(-0.01 * (t1 - t0) * 1e3, (t1 - t0) * 1.01e3)
    ax.set_xlabel("time since the first forward of the iteration (ms)")
    ax.set_title(title)
    kinds = [k for k in COMPUTE + ("comm",) if any(ev[0] == k for data in ranks for ev in data["events"])]
    ax.legend(handles=[Patch(color=COLOURS[k], label=LABELS[k]) for k in kinds],
              loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(output, dpi=120)


def expected_bubble(ranks: list[dict], pp, m, vpp: int) -> tuple[str, float | None, str]:
    """``(schedule, theoretical bubble or None, how it was computed)`` for the selected events."""
    durations = mean_durations(ranks)
    if "weight" in durations:  # ZB-H1: B and W apart; the theory depends on their lengths
        f, b, w = (durations[k] for k in COMPUTE)
        if not (pp and m):
            return "ZB-H1", None, "give --pp/-m"
        return "ZB-H1", theory_zero_bubble(pp, m, f, b, w), (
            f"p={pp} m={m}, mean F {1e3 * f:.1f} B {1e3 * b:.1f} W {1e3 * w:.1f} ms: "
            f"(p-1)(F+B-W)/(m(F+B+W)+(p-1)(F+B-W)) = {theory_zero_bubble(pp, m, f, b, w):.3f}")
    schedule = "interleaved 1F1B" if vpp > 1 else "1F1B"
    if not (pp and m):
        return schedule, None, "give --pp/-m/--vpp"
    return schedule, theory(pp, m, vpp), f"p={pp} m={m} V={vpp}: (p-1)/(V*m+p-1) = {theory(pp, m, vpp):.3f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="the --timeline-file PATH of the run (reads PATH.rank*.json)")
    parser.add_argument("--output", default="timeline.png", help="PNG to write (default timeline.png)")
    parser.add_argument("--iteration", type=int, default=-1, help="which iteration to show (default -1: the last)")
    parser.add_argument("--pp", type=int, help="pipeline stages p (default: from the files)")
    parser.add_argument("--microbatches", "-m", type=int, help="micro-batches m per iteration (default: from the files)")
    parser.add_argument("--vpp", type=int, help="virtual stages V per rank (default: from the files)")
    parser.add_argument("--no-plot", action="store_true", help="only print the bubble numbers")
    args = parser.parse_args(argv)

    ranks = select_iteration(load(args.path), args.iteration)
    t0, t1, stats = bubble_fractions(ranks)
    meta = ranks[0].get("meta", {})
    pp = args.pp or meta.get("pp_size")
    m = args.microbatches or meta.get("microbatches")
    vpp = args.vpp or meta.get("vpp_size") or 1
    schedule, expected, where = expected_bubble(ranks, pp, m, vpp)
    print(f"pipeline span {1e3 * (t1 - t0):.1f} ms; bubble = idle (incl. p2p waits) / span")
    print(f"{'rank':>5} {'busy ms':>9} {'comm ms':>9} {'bubble':>8} {'theory':>8}")
    for s in stats:
        th = f"{expected:8.3f}" if expected is not None else "       ?"
        print(f"{s['rank']:>5} {1e3 * s['busy']:9.1f} {1e3 * s['comm']:9.1f} {s['bubble']:8.3f} {th}")
    mean = sum(s["bubble"] for s in stats) / len(stats)
    print(f" mean {'':>19} {mean:8.3f}   theory {where}")
    if not args.no_plot:
        title = f"{schedule}, p={pp} m={m}" + (f" V={vpp}" if vpp > 1 else "")
        if expected is not None:
            title += f": measured bubble {mean:.1%} (theory {expected:.1%})"
        plot(ranks, t0, t1, args.output, title)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    sys.exit(main())
