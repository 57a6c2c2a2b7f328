"""What the benchmarks' anchors share (``crypten_anchor.py``, ``flower_anchor.py``): a peer
framework measured on this machine in the same run, from a venv of its own.

Each anchor is a script run by its venv's interpreter that prints one JSON object; the bench
runs it (:func:`run_json`) and falls back to dated figures when it cannot (:class:`Unavailable`
says why). Its venv is built once (:func:`build_venv`): torch alone first, the CPU build pinned,
so that nothing it asks for later can pull a CUDA build. Standard library only: the anchors
import this module from the gridq venv and, as scripts, from their own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TORCH_REQUIREMENTS = REPO / "ops" / "requirements" / "torch-cpu.txt"


class Unavailable(RuntimeError):
    """The peer framework could not be run here; ``reason`` says why (one line)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def find_python(python: str | None, env_var: str, venv: Path) -> str | None:
    """The anchor's interpreter: ``python``, else ``$env_var``, else ``venv/bin/python`` if it
    exists; None when there is none."""
    if python:
        return python
    if os.environ.get(env_var):
        return os.environ[env_var]
    candidate = venv / "bin" / "python"
    return str(candidate) if candidate.exists() else None


def run_json(python: str | None, script: Path, args: Sequence[str], *, name: str, timeout: float,
             valid: Callable[[dict[str, Any]], bool], unavailable: type[Unavailable] = Unavailable,
             install: str = "") -> dict[str, Any]:
    """Run ``script ARGS`` under ``python`` in a session of its own (a timeout, or whatever it
    leaves behind, ends with it) and return the JSON object it printed last; raise
    ``unavailable`` saying why when there is no interpreter, the run fails, overruns ``timeout``
    or prints no JSON that ``valid`` accepts. ``name`` is the framework's, for the reasons."""
    if python is None:
        raise unavailable(f"no {name} venv: {install}")
    try:
        proc = subprocess.Popen([python, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=REPO, start_new_session=True)
    except OSError as e:
        raise unavailable(f"no interpreter at {python}: {e.strerror}") from None
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise unavailable(f"{name}'s run took longer than {timeout:.0f} s") from None
    finally:
        try:  # what the run started and left behind (Ray's daemons, CrypTen's parties)
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
    if proc.returncode != 0:
        tail = (stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise unavailable(f"{name}'s run exited {proc.returncode}: {tail}")
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise unavailable(f"{name}'s run printed no JSON: {stdout[-200:]!r}") from None
    if not isinstance(result, dict) or not valid(result):
        raise unavailable(f"{name}'s run printed unexpected JSON: {lines[-1][:200]!r}")
    return result


def build_venv(root: Path, script: Path, requirements: Sequence[Path | str], *, stamp_name: str,
               base_python: str | None = None, quiet: bool = True, then: Sequence[Sequence[str]] = ()) -> Path:
    """Build ``root`` unless its stamp says it was built from the same requirements and
    ``script --check`` passes there; return its interpreter. Steps: a venv; torch alone, the CPU
    build pinned (``ops/requirements/torch-cpu.txt``: ``torch==2.13.0+cpu``, which no CUDA wheel
    satisfies); each of ``requirements`` (a file, or pip arguments after ``-r``); each of
    ``then`` (more pip install arguments); a check that no CUDA package got in and torch is still
    the CPU build; ``script --check``. Raises RuntimeError."""
    py = root / "bin" / "python"
    stamp = root / stamp_name
    digest = hashlib.sha256(TORCH_REQUIREMENTS.read_bytes())
    for item in [*requirements, *(" ".join(t) for t in then)]:
        digest.update(Path(item).read_bytes() if isinstance(item, Path) else item.encode())
    expected = digest.hexdigest()
    if py.exists() and stamp.exists() and stamp.read_text().strip() == expected and check(py, script):
        return py
    q = ["--quiet"] if quiet else []

    def run(*cmd: str | Path) -> None:
        print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
        subprocess.run([str(c) for c in cmd], check=True)

    if not py.exists():
        run(base_python or sys.executable, "-m", "venv", root)
    (root / ".gitignore").write_text(f"# made by {script.relative_to(REPO)} --install\n*\n")
    pip: list[str | Path] = [py, "-m", "pip", "install", *q]
    run(*pip, "--retries", "2", "-r", TORCH_REQUIREMENTS)
    for item in requirements:
        run(*pip, "-r", item)
    for extra in then:
        run(*pip, *extra)
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=json"],
                            capture_output=True, text=True, check=True).stdout
    versions = {p["name"].lower(): p["version"] for p in json.loads(listed)}
    cuda = [name for name in versions if name.startswith(("nvidia", "triton"))]
    if cuda:
        raise RuntimeError(f"CUDA packages got into {root}: {cuda}; remove the venv")
    if not versions.get("torch", "").endswith("+cpu"):
        raise RuntimeError(f"torch in {root} is {versions.get('torch')}, not the CPU build; remove the venv")
    if not check(py, script, verbose=True):
        raise RuntimeError(f"{script.name} --check fails in {root}")
    stamp.write_text(expected + "\n")
    return py


def check(py: Path, script: Path, verbose: bool = False) -> bool:
    """Whether ``script --check`` passes under ``py`` (the framework imports there)."""
    done = subprocess.run([str(py), str(script), "--check"], capture_output=True, text=True)
    if verbose:
        print(done.stdout.strip() or done.stderr.strip(), file=sys.stderr)
    return done.returncode == 0


def cli(doc: str, name: str, venv: Path) -> argparse.ArgumentParser:
    """An anchor's command line: ``--install``, ``--venv``, ``--check``, ``--measure``; the
    anchor adds its own options (see :func:`common_commands`)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--install", action="store_true", help=f"build {name}'s venv (idempotent)")
    parser.add_argument("--venv", help=f"with --install: where (default {venv})")
    parser.add_argument("--check", action="store_true", help=f"import {name} here, print versions")
    parser.add_argument("--measure", action="store_true",
                        help=f"from any venv: run in {name}'s venv, print its JSON or the dated fallback")
    return parser


def common_commands(args: argparse.Namespace, name: str, install: Callable[[str | None], Path],
                    figures: Callable[[], tuple[dict[str, Any], str]]) -> int | None:
    """``--install`` and ``--measure``, the same for every anchor: the exit code, or None when
    neither was asked (``--check`` and the measurement are the anchor's own)."""
    if args.install:
        started = time.perf_counter()
        py = install(args.venv)
        print(f"{name} venv ready: {py} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        return 0
    if args.measure:
        got, note = figures()
        print(note, file=sys.stderr)
        print(json.dumps(got, ensure_ascii=False))
        return 0
    return None


def busy_ticks() -> int:
    """The machine's busy CPU so far, in clock ticks (``/proc/stat``)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal


def wait_quiet(limit: float, window: float = 2.0, threshold: float = 0.15) -> float:
    """Wait (up to ``limit`` seconds) until the machine's busy CPU over ``window`` seconds is
    under ``threshold`` cores; return the last figure (as ops/bench/measure.py does)."""
    deadline = time.monotonic() + limit
    while True:
        b0 = busy_ticks()
        time.sleep(window)
        cores = (busy_ticks() - b0) / os.sysconf("SC_CLK_TCK") / window
        if cores < threshold or time.monotonic() >= deadline:
            return cores
        print(f"  the machine is busy ({cores:.2f} cores in use); waiting for a quiet moment …", file=sys.stderr)
