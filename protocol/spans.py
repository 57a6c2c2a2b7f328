"""Where the time of a request goes, phase by phase, across the processes that serve it.

``with span("open the signed request"): ...`` costs a function call unless ``GRIDQ_SPANS``
names a file when the process first records; then each span appends one JSON line (process id,
name, start on the wall clock, milliseconds) to it. Every process of a local grid inherits
the variable, so a benchmark (``ops.bench.mpc``) can put a query's phases side by side —
client, host, parties — without a profiler attached to any of them. Lines are short and
written with O_APPEND: processes appending at once do not interleave them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SPANS_ENV = "GRIDQ_SPANS"
_sink: int | None = None
_opened = False
_role = "client"  # what this process is to a request: a worker names its role (host, party) when it starts


def _output() -> int | None:
    """The file named by ``GRIDQ_SPANS`` when this process first records (or its parent's, inherited)."""
    global _sink, _opened
    if not _opened:
        path = os.environ.get(SPANS_ENV)
        _sink = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600) if path else None
        _opened = True
    return _sink


@contextmanager
def span(name: str) -> Iterator[None]:
    if _output() is None:
        yield
        return
    wall, started = time.time(), time.perf_counter()
    try:
        yield
    finally:
        record(name, wall, time.perf_counter() - started)


def record(name: str, wall: float, seconds: float) -> None:
    """One finished span (for phases a ``with`` block cannot wrap)."""
    sink = _output()
    if sink is not None:
        line = json.dumps({"pid": os.getpid(), "role": _role, "name": name, "at": wall, "ms": seconds * 1e3})
        os.write(sink, line.encode() + b"\n")


def set_role(role: str) -> None:
    global _role
    _role = role


class Tally:
    """Phases that recur (each round's compute, send, wait), added up and recorded once."""

    def __init__(self) -> None:
        self.wall, self.mark = time.time(), time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        """The time since the last lap goes to ``name``."""
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.mark
        self.mark = now

    def flush(self) -> None:
        for name, seconds in self.seconds.items():
            record(name, self.wall, seconds)


def read(path: str) -> list[dict[str, Any]]:
    """The spans recorded in ``path``, one dict each."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
