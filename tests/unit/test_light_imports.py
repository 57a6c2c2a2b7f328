"""Processes that only carry messages do not load torch (~340 MB and most of the import
time): the gateway worker and the CLI's help. Each check runs in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = "import sys\n{code}\nheavy = sorted(m for m in ('torch', 'numpy', 'opacus', 'opendp') if m in sys.modules)\n" \
        "print(','.join(heavy))"


@pytest.mark.parametrize("code", [
    "import workers.gateway.service",
    "import ops.cli",
    "from ops.cli import app\ntry:\n    app(['--help'])\nexcept SystemExit:\n    pass",
    "from ops.cli import app\ntry:\n    app(['requests', 'approve', '--help'])\nexcept SystemExit:\n    pass",
    "import protocol.messages, protocol.envelope, protocol.plan, protocol.model_spec",
])
def test_no_torch_where_it_is_not_used(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", CHECK.format(code=code)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "torch" not in done.stdout.strip().split(","), f"{code!r} loaded: {done.stdout.strip()}"


def test_the_check_sees_torch_when_it_is_loaded() -> None:
    done = subprocess.run([sys.executable, "-c", CHECK.format(code="import protocol.interpret")],
                          capture_output=True, text=True, timeout=60)
    assert "torch" in done.stdout.strip().split(",")
