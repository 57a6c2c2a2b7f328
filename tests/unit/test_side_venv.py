"""The benchmarks' anchors (CrypTen, Flower) run a script in a venv of their own and read the
JSON it prints (ops/bench/side_venv.py): every way that can go wrong is a one-line reason for
the table's fallback note, never a crash of the bench."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from ops.bench.side_venv import Unavailable, find_python, run_json


def script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "anchor.py"
    path.write_text(body)
    return path


def run(path: Path, timeout: float = 30, python: str | None = sys.executable) -> dict[str, object]:
    return run_json(python, path, ["--x", "1"], name="Peer", timeout=timeout, install="peer --install",
                    valid=lambda got: isinstance(got.get("ms"), dict))


def test_the_last_json_line_is_the_answer(tmp_path: Path) -> None:
    path = script(tmp_path, 'import json, sys\nprint("log line")\n'
                            'print(json.dumps({"ms": {"a": 1}, "argv": sys.argv[1:]}))\n')
    assert run(path) == {"ms": {"a": 1}, "argv": ["--x", "1"]}


@pytest.mark.parametrize(("body", "reason"), [
    ('import sys\nprint("boom", file=sys.stderr)\nsys.exit(3)\n', "Peer's run exited 3: boom"),
    ('print("no json here")\n', "Peer's run printed no JSON"),
    ('print(\'{"ms": 5}\')\n', "Peer's run printed unexpected JSON"),
    ('import time\ntime.sleep(30)\n', "Peer's run took longer than 1 s"),
])
def test_each_failure_is_a_reason_not_a_crash(tmp_path: Path, body: str, reason: str) -> None:
    started = time.monotonic()
    with pytest.raises(Unavailable) as raised:
        run(script(tmp_path, body), timeout=1)
    assert raised.value.reason.startswith(reason)
    assert time.monotonic() - started < 15  # a hung run is killed at its timeout


def test_no_interpreter_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match="no Peer venv: peer --install"):
        run(script(tmp_path, ""), python=None)
    with pytest.raises(Unavailable, match="no interpreter at /nowhere/python"):
        run(script(tmp_path, ""), python="/nowhere/python")


def test_the_interpreter_is_the_one_given_else_the_environments_else_the_venvs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv = tmp_path / "venv"
    monkeypatch.delenv("PEER_PYTHON", raising=False)
    assert find_python(None, "PEER_PYTHON", venv) is None
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    assert find_python(None, "PEER_PYTHON", venv) == str(venv / "bin" / "python")
    monkeypatch.setenv("PEER_PYTHON", "/env/python")
    assert find_python(None, "PEER_PYTHON", venv) == "/env/python"
    assert find_python("/given/python", "PEER_PYTHON", venv) == "/given/python"
