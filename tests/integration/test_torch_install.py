"""A fresh machine installs torch's CPU build, never the CUDA one (ops/requirements/torch-cpu.txt).

The resolution is checked with ``pip install --dry-run --report`` in isolated mode: no pip
configuration, no find-links, no wheel cache — what a fresh clone on a fresh machine sees.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[2] / "ops" / "requirements" / "torch-cpu.txt"
CUDA = re.compile(r"^(nvidia-.*|triton|cuda-.*)$", re.IGNORECASE)


def cuda_packages(names: list[str]) -> list[str]:
    return sorted(n for n in names if CUDA.match(n))


def dry_run(tmp_path: Path, *requirement: str) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    """What pip would install, with nothing but the indexes the requirement names (and PyPI)."""
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--isolated", "--no-cache-dir", "--dry-run",
                           "--ignore-installed", "--retries", "2", "--report", str(report), *requirement],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return done, {}
    items = json.loads(report.read_text())["install"]
    return done, {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in items}


def test_the_installed_torch_is_the_cpu_build() -> None:
    import torch

    assert torch.__version__.endswith("+cpu"), torch.__version__
    assert cuda_packages([d.metadata["Name"] for d in metadata.distributions()]) == []


def test_a_fresh_resolution_takes_the_cpu_build_or_nothing(tmp_path: Path) -> None:
    done, versions = dry_run(tmp_path, "-r", str(REQUIREMENTS))
    if done.returncode == 0:  # PyTorch's CPU index reachable
        assert versions["torch"] == "2.13.0+cpu"
        assert cuda_packages(list(versions)) == []
    else:  # unreachable (as on a machine without it): pip stops, it does not fall back to PyPI's CUDA build
        assert "torch==2.13.0+cpu" in done.stderr, done.stderr[-2000:]
        assert re.search(r"No matching distribution|ResolutionImpossible", done.stderr), done.stderr[-2000:]


def test_the_public_index_alone_gives_the_cuda_build(tmp_path: Path) -> None:
    """The control: what the plain pin resolves to on PyPI, and what the check above would catch."""
    done, versions = dry_run(tmp_path, "torch==2.13.0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert versions["torch"] == "2.13.0"
    assert len(cuda_packages(list(versions))) >= 10
