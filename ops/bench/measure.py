"""Measuring helpers for the benchmarks: timing loops, percentiles, the load other processes
put on the machine meanwhile, Celery's own task run times from a worker's log, and timers
wrapped around functions of this process for a breakdown.

    samples, other_cores = timed(lambda: app.send_task("add", (1, 2)).get(), n=300, warmup=30)
    row = Row("bare round trip", (samples, other_cores))
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


def _busy_ticks() -> int:
    """CPU ticks spent busy by the whole machine since boot (all cores)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # less idle and iowait


def tree_ticks(root: int | None = None) -> int:
    """CPU ticks of process ``root`` (default: this one) and all its descendants (redis,
    gateway, workers, pools)."""
    tree, ticks = _tree(os.getpid() if root is None else root)
    return sum(ticks.get(pid, 0) for pid in tree)


def tree_pids(root: int) -> set[int]:
    """Process ``root`` and all its descendants (a worker and its pool processes)."""
    return _tree(root)[0]


def _tree(root: int) -> tuple[set[int], dict[int, int]]:
    """The pids of ``root``'s process tree, and every process's CPU ticks."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parent[int(entry)] = int(rest[1])
        ticks[int(entry)] = sum(int(v) for v in rest[11:15])  # utime stime cutime cstime
    tree, changed = {root}, True
    while changed:
        changed = False
        for pid, ppid in parent.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                changed = True
    return tree, ticks


def rss_bytes(pids: set[int] | list[int]) -> int:
    """Resident memory of these processes, summed (VmRSS: pages they share count in each)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):  # gone meanwhile, or a zombie
            continue
    return total


class Load:
    """CPU used by processes outside this benchmark while the block ran, in cores."""

    cores = 0.0

    def __enter__(self) -> Load:
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_ticks(), tree_ticks()
        return self

    def __exit__(self, *exc: object) -> None:
        seconds = time.perf_counter() - self.t0
        other = (_busy_ticks() - self.busy0) - (tree_ticks() - self.own0)
        self.cores = max(0.0, other / os.sysconf("SC_CLK_TCK") / seconds)


def wait_quiet(limit: float, say: Callable[[str], None], window: float = 2.0, threshold: float = 0.15) -> float:
    """Wait (up to ``limit`` seconds) until the machine's busy CPU over ``window`` seconds is
    under ``threshold`` cores; return the last figure."""
    hz, deadline = os.sysconf("SC_CLK_TCK"), time.monotonic() + limit
    while True:
        b0 = _busy_ticks()
        time.sleep(window)
        cores = (_busy_ticks() - b0) / hz / window
        if cores < threshold or time.monotonic() >= deadline:
            return cores
        say(f"  the machine is busy ({cores:.2f} cores in use); waiting for a quiet moment …")


def timed(fn: Callable[[], Any], n: int, warmup: int) -> tuple[list[float], float]:
    """Milliseconds of ``n`` sequential calls after ``warmup`` unrecorded ones, and the load
    of other processes on the machine meanwhile (cores)."""
    for _ in range(warmup):
        fn()
    out = []
    with Load() as load:
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1000)
    return out, load.cores


def p(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q)) if samples else float("nan")


class Row:
    """One line of the results: a measurement, its percentiles and its ratio to a baseline."""

    def __init__(self, what: str, measured: tuple[list[float], float], baseline: Row | None = None) -> None:
        self.what, (self.samples, self.other_load), self.baseline = what, measured, baseline
        self.p50, self.p99 = p(self.samples, 50), p(self.samples, 99)

    @property
    def ratio(self) -> str:
        return f"{self.p50 / self.baseline.p50:.2f}×" if self.baseline else "1 (baseline)"


_SUCCEEDED = re.compile(r"Task (\S+)\[[^\]]+\] succeeded in ([0-9.e-]+)s")


class WorkerLog:
    """Celery's own run time of a task in the worker ("succeeded in …s", which counts the
    STARTED state, the task and storing its result), read from the part of the worker's
    log written while the block ran."""

    ms: list[float] = []

    def __init__(self, path: Path, task: str) -> None:
        self.path, self.task = path, task

    def __enter__(self) -> WorkerLog:
        self.start = self.path.stat().st_size
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)  # the last task's log line
        with open(self.path, "rb") as f:
            f.seek(self.start)
            text = f.read().decode(errors="replace")
        self.ms = [float(s) * 1000 for name, s in _SUCCEEDED.findall(text) if name == self.task]


@contextlib.contextmanager
def phases(*targets: tuple[Any, str, str]) -> Iterator[dict[str, list[float]]]:
    """Time every call of ``owner.attr`` under ``label`` while the block runs (this process
    only; the functions are put back after)."""
    found: dict[str, list[float]] = {label: [] for _, _, label in targets}
    saved: list[tuple[Any, str, Any, bool]] = []
    for owner, attr, label in targets:
        original = getattr(owner, attr)

        def timed_call(*a: Any, _f: Any = original, _label: str = label, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                found[_label].append((time.perf_counter() - t0) * 1000)

        saved.append((owner, attr, vars(owner).get(attr), attr in vars(owner)))
        setattr(owner, attr, timed_call)
    try:
        yield found
    finally:
        for owner, attr, original, own in reversed(saved):
            if own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)
