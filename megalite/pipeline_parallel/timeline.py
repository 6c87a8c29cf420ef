"""Per-rank record of when each forward, backward and p2p exchange ran (``--timeline-file``)."""
from __future__ import annotations

import json
import os
import time


class Timeline:
    """Collects ``(kind, start, end)`` events with times relative to its creation.

    Kinds: ``forward``, ``backward`` (schedules), ``comm`` (p2p) and ``iteration`` (the span of
    one training iteration's schedule, so a plot can pick the last iteration). ``meta`` (pipeline
    sizes, micro-batches) is saved along for the theoretical bubble. ``origin`` is saved too: it
    is ``time.perf_counter()``, a clock shared by the processes of one machine, so the ranks'
    files can be put on one time axis.
    """

    def __init__(self, rank: int, **meta):
        self.rank, self.meta = rank, meta
        self.origin = time.perf_counter()
        self.events: list[tuple[str, float, float]] = []

    def record(self, kind: str, start: float, end: float) -> None:
        """Add one event; ``start``/``end`` are ``time.perf_counter()`` values."""
        self.events.append((kind, start - self.origin, end - self.origin))

    def save(self, path: str) -> None:
        """Write ``{path}.rank{N}.json`` (one file per rank; tools/plot_timeline.py merges them)."""
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        with open(f"{path}.rank{self.rank}.json", "w") as f:
            json.dump({"rank": self.rank, "origin": self.origin, "meta": self.meta, "events": self.events}, f)
