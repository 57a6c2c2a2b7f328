"""Every code block of the README runs, as written, against a grid started by `gridq up`.

Doctest-style: the blocks are taken from README.md in order. Python blocks run in one
namespace (a later block uses what an earlier one defined, as a reader's session would), with
the two variables `gridq up` prints exported. Shell lines run as commands and must exit 0,
except the ones that start long-running servers or the whole build (`gridq up`, `node
start`, `make test` …): for those the command line is parsed by the CLI (or by make -n),
which catches a renamed command or option. TOML blocks must parse; the `text` block must
match what `gridq up` prints. Two placeholders stand for ids known only at run time: the
request ids `hospital:9f3c` and `hospital:7b21` are the README's `first.id` and `second.id`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import typer

from ops.cli import app

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
EXPORTS = r'export GRIDQ_BROKER="\$\(cat \S+/broker/scientist\.url\)" GRIDQ_HOME=\S+\n'
SERVERS = {("up",), ("demo",), ("flower",), ("edge",), ("node", "start"), ("mpc", "start"), ("gateway", "start")}


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer((ROOT / "README.md").read_text())]


@pytest.fixture(scope="module")
def grid_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("gridq-home")
    log = open(home.parent / "up.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "up", "--home", str(home)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (home / "env.sh").exists():
            assert proc.poll() is None, (home.parent / "up.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "gridq up did not come up in 240 s"
            time.sleep(0.5)
        exports, path = (home / "env.sh").read_text().split("\n", 1)
        assert re.fullmatch(EXPORTS, exports + "\n")  # what the README shows, then the line that puts gridq on PATH
        assert "export PATH=" in path
        shown = subprocess.run(["bash", "-c", 'source "$1" && printf "%s\n%s" "$GRIDQ_BROKER" "$GRIDQ_HOME"', "-",
                                str(home / "env.sh")], capture_output=True, text=True, check=True, timeout=10)
        broker, gridq_home = shown.stdout.split("\n")
        yield {"GRIDQ_BROKER": broker, "GRIDQ_HOME": gridq_home}
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: it stops its own grid
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert not (home / "env.sh").exists()


def parse_only(args: list[str]) -> None:
    """What click would run for ``gridq ARGS``, down to the command, without running it."""
    command: click.Command = typer.main.get_command(app)
    ctx = command.make_context("gridq", list(args), resilient_parsing=False)
    while isinstance(command, click.Group):
        name, sub, rest = command.resolve_command(ctx, ctx._protected_args + ctx.args)
        assert sub is not None, args
        command, ctx = sub, sub.make_context(name or "", rest, parent=ctx)


def run_shell_line(line: str, env: dict[str, str], cwd: Path) -> None:
    argv = shlex.split(line, comments=True)
    if not argv:
        return
    if argv[0] == "make":
        done = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{line}: {done.stderr}"
        return
    if argv[0].endswith("python") and argv[1] == "-m":
        assert importlib.util.find_spec(argv[2]) is not None, line
        return
    assert argv[0].endswith("gridq"), f"a README command this test does not know: {line}"
    args = argv[1:]
    if tuple(a for a in args[:2] if not a.startswith("-")) in SERVERS or (args[0],) in SERVERS:
        parse_only(args)
        return
    done = subprocess.run([sys.executable, "-m", "ops.cli", *args], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"


def test_gridq_up_gives_scientists_a_broker_user_without_owner_rights(grid_up: dict[str, str]) -> None:
    import redis

    assert grid_up["GRIDQ_BROKER"].startswith("redis://scientist:")
    with redis.Redis.from_url(grid_up["GRIDQ_BROKER"]) as scientist:
        assert scientist.llen("node.hospital") >= 0  # it may send jobs …
        with pytest.raises(redis.exceptions.NoPermissionError):
            scientist.flushall()                     # … but not wipe the broker
        with pytest.raises(redis.exceptions.NoPermissionError):
            scientist.brpop(["node.hospital"], timeout=1)  # nor take a node's jobs


def test_every_readme_block_runs_against_gridq_up(grid_up: dict[str, str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in grid_up.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme"}
    seen = {"python": 0, "sh": 0, "toml": 0, "text": 0}
    for number, (language, code) in enumerate(blocks()):
        where = f"README block {number} ({language}):\n{code}"
        if language == "python":
            exec(compile(code, f"README-block-{number}", "exec"), namespace)  # noqa: S102 - our own README
        elif language == "sh":
            for line in code.splitlines():
                if "first" in namespace:
                    line = line.replace("hospital:9f3c", namespace["first"].id[:18])
                    line = line.replace("hospital:7b21", namespace["second"].id[:18])
                run_shell_line(line, grid_up, tmp_path)
        elif language == "toml":
            tomllib.loads(code)
        elif language == "text":
            assert re.fullmatch(EXPORTS, code), where
        else:
            raise AssertionError(f"no rule for {where}")
        seen[language] += 1
    assert seen["python"] >= 7 and seen["sh"] >= 5, seen
    # what the blocks claim
    assert namespace["first"].wait().status == "done"          # approved by the sh block
    assert (namespace["y"] - namespace["model"](namespace["x"])).abs().max() < 1e-3
    from orchestrator.grid import Grid

    for value in namespace.values():  # the README's session stays open, as a user's would; closed here, not by GC
        if isinstance(value, Grid):
            value.close()
