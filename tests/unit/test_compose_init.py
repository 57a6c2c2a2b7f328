"""Flower's password in a compose grid: written once by `init` (mode 0600, kept on re-run),
and `gridq flower` refusing to serve off loopback without basic auth. Flower itself is never
started here: Celery's entry point is replaced by a stand-in that records its argv."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ops.cli import app
from ops.compose_init import flower_auth
from ops.flower_app import is_loopback


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_a_random_secret_once_readable_by_its_owner_only(tmp_path: Path):
    old = os.umask(0)  # the file's mode must not depend on the umask
    try:
        path = flower_auth(tmp_path)
    finally:
        os.umask(old)
    assert path == tmp_path / "flower.auth" and mode(path) == 0o600
    user, secret = path.read_text().strip().split(":")
    assert user == "operator" and len(secret) >= 32
    first = path.read_text()
    path.chmod(0o644)
    assert flower_auth(tmp_path) == path  # a re-run keeps the secret the operator was given ...
    assert path.read_text() == first and mode(path) == 0o600  # ... and puts its mode right
    other = tmp_path / "other"
    other.mkdir()
    assert flower_auth(other).read_text() != first  # random, not a constant


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("", False), ("::", False), ("192.168.1.10", False), ("flower.example.org", False)])
def test_loopback_addresses(address: str, loopback: bool):
    assert is_loopback(address) is loopback


@pytest.fixture()
def flower_runs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Each argv `gridq flower` would start Flower with; the environment is restored after."""
    started: list[list[str]] = []
    # ops.flower_app.run ends the process when Flower stops (os._exit): it must not run here
    monkeypatch.setattr("ops.flower_app.run", lambda argv: started.append(list(argv)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    for name in ("FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API"):
        # set, then delete: monkeypatch then restores the variable's absence even after the
        # command under test sets it (a bare delenv of an unset name records nothing to undo,
        # and the password leaked into later tests' Flower processes)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("GRIDQ_BROKER", "redis://127.0.0.1:1/0")
    return started


def flower(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["flower", "--broker", "redis://127.0.0.1:1/0", *args])


def test_flower_off_loopback_without_auth_is_refused(flower_runs: list[list[str]]):
    for address in ("0.0.0.0", "", "10.0.0.5"):
        result = flower("--address", address)
        assert result.exit_code == 1, result.output
        assert result.output.startswith("error: Flower on ")
        assert "--auth-file" in result.output and "FLOWER_BASIC_AUTH" in result.output
    assert flower_runs == [] and "FLOWER_UNAUTHENTICATED_API" not in os.environ


def test_flower_off_loopback_with_an_auth_file(flower_runs: list[list[str]], tmp_path: Path):
    auth = flower_auth(tmp_path)
    os.environ["FLOWER_UNAUTHENTICATED_API"] = "true"  # no effect once a password is set: it is taken away
    result = flower("--address", "0.0.0.0", "--auth-file", str(auth))
    assert result.exit_code == 0, result.output
    (argv,) = flower_runs
    assert "--address=0.0.0.0" in argv
    assert os.environ["FLOWER_BASIC_AUTH"] == auth.read_text().strip()
    assert not any(auth.read_text().strip().split(":")[1] in a for a in argv)  # `ps` shows no password
    assert "FLOWER_UNAUTHENTICATED_API" not in os.environ


def test_flower_off_loopback_with_flower_basic_auth(flower_runs: list[list[str]]):
    os.environ["FLOWER_BASIC_AUTH"] = "ops:s3cret-enough"
    assert flower("--address", "0.0.0.0").exit_code == 0
    assert len(flower_runs) == 1 and "FLOWER_UNAUTHENTICATED_API" not in os.environ


def test_flower_on_loopback_needs_no_password(flower_runs: list[list[str]]):
    result = flower()
    assert result.exit_code == 0, result.output
    assert "--address=127.0.0.1" in flower_runs[0] and os.environ["FLOWER_UNAUTHENTICATED_API"] == "true"
    assert "FLOWER_BASIC_AUTH" not in os.environ


def test_flower_auth_files_that_are_refused(flower_runs: list[list[str]], tmp_path: Path):
    missing = tmp_path / "nope.auth"
    result = flower("--address", "0.0.0.0", "--auth-file", str(missing))
    assert result.exit_code == 1 and result.output.startswith("error: NotFound: no Flower auth file at")
    loose = tmp_path / "loose.auth"
    loose.write_text("operator:a-long-enough-secret\n")
    loose.chmod(0o644)
    result = flower("--address", "0.0.0.0", "--auth-file", str(loose))
    assert result.exit_code == 1 and f"chmod 600 {loose}" in result.output
    for text in ("no-colon-here", "operator:", "op erator:secret", "a:b,c:d", "a:b\nc:d"):
        bad = tmp_path / "bad.auth"
        bad.write_text(text)
        bad.chmod(0o600)
        result = flower("--address", "0.0.0.0", "--auth-file", str(bad))
        assert result.exit_code == 1 and "one line 'user:password'" in result.output, text
    os.environ["FLOWER_BASIC_AUTH"] = "no password"
    result = flower("--address", "0.0.0.0")
    assert result.exit_code == 1 and "FLOWER_BASIC_AUTH must be user:password" in result.output
    assert flower_runs == []
