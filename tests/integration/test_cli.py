"""The owner's and operator's commands as a person types them: node names for configs, ids
by unique prefix, MPC workers in `gridq status`, and every error as one `error:` line."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ops.cli import app
from ops.local import NODE_CONFIGS, LocalGrid


def gridq(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The installed entry point, as a shell runs it (errors included)."""
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=cwd)


@pytest.fixture()
def owner_env(local_grid: LocalGrid) -> dict[str, str]:
    return {"GRIDQ_HOME": str(local_grid.home), "GRIDQ_BROKER": local_grid.url, "COLUMNS": "80"}


@pytest.fixture()
def two_requests(local_grid: LocalGrid, ward: Path) -> Iterator[tuple[str, str]]:
    """Two of carol's compute jobs parked at the manual-approval node ``ward`` (approving one
    changes nothing but that job: no one becomes an allowed user of anything)."""
    shutil.copy(ward, local_grid.home / "nodes" / "ward.toml")  # where a node name is looked up
    with local_grid.connect("carol") as carol:
        births = carol.search("#ward")["ward"][0]
        first, second = births.sum().submit(), births.mean().submit()
        for ticket in (first, second):
            while ticket.status in ("queued", "running"):
                time.sleep(0.02)
            assert ticket.status == "pending_approval"
        yield first.id, second.id
        assert first.wait(timeout=30).status == "done"  # approved below: carol's ticket completes


def test_requests_by_node_name_whole_ids_and_unique_prefixes(two_requests: tuple[str, str], ward: Path,
                                                             owner_env: dict[str, str]) -> None:
    first, second = two_requests
    listed = CliRunner().invoke(app, ["requests", "list", "ward"], env=owner_env)  # $GRIDQ_HOME/nodes/ward.toml
    assert listed.exit_code == 0, listed.output
    assert first in listed.output and second in listed.output  # whole, in 80 columns
    in_terminal = CliRunner().invoke(app, ["requests", "list", "ward"], env={**owner_env, "TTY_COMPATIBLE": "1",
                                                                              "NO_COLOR": "1"})
    lines = re.sub(r"\x1b\[[0-9;]*m", "", in_terminal.output).splitlines()
    assert all(len(line) <= 80 for line in lines) and "…" not in in_terminal.output, in_terminal.output
    assert any(first in line for line in lines) and any(second in line for line in lines)  # each id on one line
    listed_json = gridq("requests", "list", "ward", "--json", env=owner_env).stdout
    as_json = [json.loads(line) for line in listed_json.splitlines()]
    assert {r["id"]: (r["requester"], r["status"]) for r in as_json} == {first: ("carol", "pending"),
                                                                        second: ("carol", "pending")}

    ambiguous = gridq("requests", "approve", "ward", "ward:", env=owner_env)
    assert ambiguous.returncode == 1
    assert ambiguous.stderr.startswith("error: InvalidRequest:") and "give more of the id" in ambiguous.stderr
    assert len(ambiguous.stderr.strip().splitlines()) == 1

    unique = first[:14]
    assert not second.startswith(unique)
    approved = gridq("requests", "approve", str(ward), unique, env=owner_env)
    assert approved.returncode == 0, approved.stderr
    assert f"approved {first}" in approved.stdout
    denied = gridq("requests", "deny", "ward", second.split(":")[1][:12], "--reason", "no", env=owner_env)
    assert denied.returncode == 0, denied.stderr
    assert f"denied {second}" in denied.stdout
    assert gridq("requests", "list", "ward", env=owner_env).stdout == "no requests waiting for your decision\n"


@pytest.fixture()
def public_mpc(local_grid: LocalGrid) -> Iterator[None]:
    """The MPC worker of the MPC-only node ``public``, for this test only (other tests start
    the pool themselves: a second worker on its queue would change what they see)."""
    assert "public-mpc" not in local_grid.procs
    local_grid.start_mpc(NODE_CONFIGS / "public.toml")
    try:
        local_grid.wait_ready(["public"], workers=["public-mpc"])
        yield
    finally:
        local_grid.kill("public-mpc", signal.SIGTERM)


def test_status_shows_mpc_queues_and_workers(local_grid: LocalGrid, public_mpc: None) -> None:
    result = CliRunner().invoke(app, ["status", "--broker", local_grid.url], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = {tuple(c.strip() for c in line.split("│")[1:3]): line for line in result.output.splitlines()
            if line.count("│") > 3}
    assert "up" in rows[("public", "mpc.public")]
    assert "down" not in rows[("public", "node.public")] and "MPC worker only" in rows[("public", "node.public")]
    assert "up" in rows[("hospital", "node.hospital")]


def test_errors_are_one_line(tmp_path: Path, owner_env: dict[str, str]) -> None:
    assert gridq("keys", "new", "kim", "--dir", str(tmp_path)).returncode == 0
    again = gridq("keys", "new", "kim", "--dir", str(tmp_path))
    assert again.returncode == 1 and again.stderr.startswith("error: InvalidRequest:") and "--force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    missing = gridq("runs", "list", "--db", str(tmp_path / "nothing.db"))
    assert missing.returncode == 1 and missing.stderr.startswith("error: NotFound: no run history")

    unknown = gridq("requests", "show", "hospital", "hospital:ffffffff", env=owner_env)
    assert unknown.returncode == 1 and unknown.stderr.startswith("error: NotFound: no request")

    no_node = gridq("requests", "list", "atlantis", env=owner_env)
    assert no_node.returncode == 1 and "atlantis.toml does not exist" in no_node.stderr


def test_runs_list_takes_a_path(tmp_path: Path) -> None:
    from orchestrator.history import History

    db = tmp_path / "runs.db"
    History(f"sqlite:///{db}")
    listed = gridq("runs", "list", "--db", str(db))
    assert listed.returncode == 0, listed.stderr
    assert "run" in listed.stdout
