"""Unit-test setup: keep Hypothesis' on-disk caches out of the repository, and the
``ts_roundtrip`` fixture of the TypeScript client's interop tests.

Hypothesis writes example databases and a constants cache under ``.hypothesis/`` in the
working directory; the unit tests do no I/O beyond temporary files, so point it at a
temporary directory that is removed when the test process ends.
"""

from __future__ import annotations

import atexit
import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

_HOME = tempfile.mkdtemp(prefix="gridq-unit-hypothesis-")
set_hypothesis_home_dir(_HOME)
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "ts"
ROUNDTRIP = CLIENT / "scripts" / "roundtrip.mjs"
RoundTrip = Callable[..., list[dict[str, Any]]]


def _roundtrip(*requests: dict[str, Any]) -> list[dict[str, Any]]:
    """The TS client's answers to ``requests`` (one node process for all of them)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: the TypeScript client's interop tests need Node 20 "
                    "(see clients/ts/README.md)")
    if not (CLIENT / "dist" / "index.js").exists():
        pytest.fail("clients/ts/dist is missing: run `make ts` (npm ci, build and test of the TypeScript client) first")
    done = subprocess.run([node, str(ROUNDTRIP)], input=json.dumps({"requests": list(requests)}), capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    results: list[dict[str, Any]] = json.loads(done.stdout)["results"]
    return results


@pytest.fixture(scope="session")
def ts_roundtrip() -> RoundTrip:
    """``ts_roundtrip(*requests)``: the built TypeScript client's answers to ``requests``, run
    through ``node clients/ts/scripts/roundtrip.mjs`` (test_ts_interop.py, test_ts_wire.py). No
    skip: without ``node`` or the build (``make ts``) the test fails."""
    return _roundtrip
