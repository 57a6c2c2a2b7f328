"""The FL benchmark's memory figure (ops/bench/tree_memory.py), for gridq's grid and Flower's
simulation alike: this process and its descendants, and a part of them by its roots."""

from __future__ import annotations

import subprocess
import sys

from ops.bench.tree_memory import PeakMemory

HOLD = 64 * 2**20  # what the child writes to and keeps: private, so all of it counts in its PSS


def test_a_childs_memory_counts_in_the_tree_and_in_its_part() -> None:
    child = subprocess.Popen([sys.executable, "-c", f"import sys, time\nb = bytearray({HOLD})\nb[::4096] = b'x' * "
                              f"len(b[::4096])\nprint('ready', flush=True)\ntime.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        peak = PeakMemory({"child": {child.pid}})
        peak.sample()
        assert peak.processes >= 2 and peak.parts["child"] >= HOLD
        assert peak.pss >= peak.parts["child"] + 1 and peak.rss >= peak.pss
        assert child.pid in peak.related()
        assert any(pss >= HOLD for _, pss in peak.at_peak)
    finally:
        child.kill()
        child.communicate()
