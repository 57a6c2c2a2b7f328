"""What the browser tests share: Debian's headless chromium for playwright, never a
downloaded browser. A missing one fails the test (``make browser`` installs it), never skips it."""

from __future__ import annotations

import importlib.util
import shutil
from typing import Any

import pytest

LAUNCH_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]  # root, containers' small /dev/shm


@pytest.fixture(scope="session")
def chromium() -> dict[str, Any]:
    """playwright's ``chromium.launch`` arguments for the system's chromium."""
    if importlib.util.find_spec("playwright") is None:
        pytest.fail("the Python package playwright is not installed: `make browser` (.venv/bin/pip install playwright)")
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("no `chromium` on PATH: `make browser` installs Debian's (apt-get install chromium)")
    return {"executable_path": path, "headless": True, "args": LAUNCH_ARGS}
