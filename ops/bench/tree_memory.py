"""The peak memory of a process tree, sampled while a benchmark runs (``ops/bench/fl.py`` for
gridq's grid, ``ops/bench/flower_anchor.py`` for Flower's simulation): the same count for both.

Every 0.5 s, the sum of RSS and of PSS (``/proc/<pid>/smaps_rollup``) over this process and its
relatives: its descendants; every process of its Unix session when it leads one (what a
process that daemonized itself out of the tree, reparented to init, keeps); and any process
whose parent was seen in an earlier sample. PSS counts a page shared by n processes 1/n in
each, so it adds up across processes; RSS counts it in every one. A sample costs CPU (~0.15 s
with ten torch processes, read in ``cpu``): sample a run that is not timed, or say so.
Standard library only: Flower's venv imports it too.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path


def processes() -> dict[int, tuple[int, int]]:
    """Every process: pid → (parent pid, session id)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(entry)] = (int(fields[1]), int(fields[3]))
    return out


def rollup(pid: int) -> tuple[int, int]:
    """A process's RSS and PSS in bytes (0, 0 once it is gone)."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:  # gone, or a kernel thread
        pass
    return rss, pss


def name(pid: int) -> str:
    """A short name for a process: its script's (``dashboard.py``) or its program's."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in args if a]
    script = next((w for w in words[1:3] if w.endswith(".py")), None)  # python …/dashboard.py
    return Path(script).name if script else Path(words[0]).name if words else "?"


def own_ticks(pids: set[int]) -> int:
    """The CPU the processes ``pids`` used so far, in clock ticks."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total


class PeakMemory:
    """Samples this process and its relatives every 0.5 s while the block runs; keeps the
    peaks: ``rss``, ``pss``, ``processes``; ``parts[name]``, the peak PSS of the processes under
    the roots given for that name (a grid's node workers, say); ``at_peak``, each process's
    name and PSS in the sample of peak PSS."""

    def __init__(self, parts: Mapping[str, set[int]] | None = None) -> None:
        self.rss = self.pss = self.processes = 0
        self.roots = dict(parts or {})
        self.parts = dict.fromkeys(self.roots, 0)
        self.cpu = 0.0  # the sampling's own CPU seconds
        self.at_peak: list[tuple[str, int]] = []
        self.seen: set[int] = set()
        self.me = os.getpid()
        self.session = os.getsid(0) if os.getsid(0) == self.me else None  # only a session of our own
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def related(self, procs: Mapping[int, tuple[int, int]] | None = None) -> set[int]:
        """This process and its relatives, now (among ``procs``: default, every process)."""
        procs = processes() if procs is None else procs
        children = _children(procs)
        found = {pid for pid, (ppid, sid) in procs.items()
                 if (self.session is not None and sid == self.session) or ppid in self.seen}
        found |= _under(children, {self.me, *found})
        self.seen |= found
        return found & procs.keys()

    def sample(self) -> None:
        cpu = time.thread_time()
        procs = processes()
        pids = self.related(procs)
        figures = {p: rollup(p) for p in pids}
        self.rss = max(self.rss, sum(r for r, _ in figures.values()))
        pss = sum(p for _, p in figures.values())
        if pss > self.pss:
            self.pss, self.at_peak = pss, [(name(p), figures[p][1]) for p in sorted(pids)]
        self.processes = max(self.processes, len(pids))
        children = _children(procs)
        for part, roots in self.roots.items():
            self.parts[part] = max(self.parts[part], sum(figures.get(p, (0, 0))[1] for p in _under(children, roots)))
        self.cpu += time.thread_time() - cpu

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.5)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _children(procs: Mapping[int, tuple[int, int]]) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    return children


def _under(children: Mapping[int, list[int]], roots: set[int]) -> set[int]:
    """``roots`` and all their descendants."""
    found: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, []))
    return found
