"""A scientist lists her requests at every node while one node's worker has just been killed
(kill -9): it still counts as up — its last word that it is, ``ALIVE_TTL_SECONDS`` long, stands
— so its listing job is taken and never answered. On real workers: ``grid.requests()`` returns
within seconds (a bounded wait, not the client's timeout) with the other node's requests and
names the silent node in ``missing``; asked of that node alone, it raises NodeUnavailable;
``gridq my-requests list`` prints the rows it got and a line naming the node (on stderr, so
that ``--json`` stays one request a line). The TypeScript client's ``grid.requests()`` is
checked the same way in test_ts_requests.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from ops.cli import app
from ops.local import LocalGrid
from orchestrator import RequestList
from orchestrator.grid import REQUESTS_WAIT_SECONDS
from protocol.contract import alive_key, node_queue
from protocol.errors import NodeUnavailable

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def heard(manual_node) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    """A manual node that stays up: it answers."""
    yield from manual_node("heard")


@pytest.fixture(scope="module")
def hushed(manual_node) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    """A manual node whose worker the test kills."""
    yield from manual_node("hushed")


def _settled(ticket: Any, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while (status := ticket.status) in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.02)
    return status


def _table_ids(output: str) -> set[str]:
    """The ids of a table as `gridq` prints it piped (one line a row, every value whole)."""
    return {line.split(line[0])[1].strip() for line in output.splitlines() if line.startswith("│")}


def test_a_node_killed_moments_ago_is_named_not_waited_for(local_grid: LocalGrid, heard: Path, hushed: Path) -> None:
    alive = alive_key(node_queue("hushed"))
    with local_grid.connect("carol") as carol, redis.Redis.from_url(local_grid.url) as admin:
        here = carol.search("#heard")["heard"][0]["weight"].sum().submit()  # compute: waits for the owner
        there = carol.search("#hushed")["hushed"][0]["weight"].sum().submit()
        assert {_settled(t) for t in (here, there)} == {"pending_approval"}
        local_grid.kill("hushed")  # SIGKILL: its worker says nothing more
        try:
            assert admin.exists(alive)  # and still counts as up: the case at hand

            started = time.monotonic()
            listed = carol.requests()
            took = time.monotonic() - started
            assert took < REQUESTS_WAIT_SECONDS + 5 < carol.timeout  # the bounded wait, not the 60 s timeout
            assert isinstance(listed, RequestList)
            ids = [r.id for r in listed]
            assert here.id in ids and not any(i.startswith("hushed:") for i in ids)
            assert list(listed.missing) == ["hushed"]  # only the silent node: the others all answered
            assert listed.missing["hushed"].startswith(f"no answer within {REQUESTS_WAIT_SECONDS:g} s: its worker "
                                                       "may have stopped in the last 20 s")
            assert repr(listed).startswith("RequestList([") and repr(listed).endswith("missing ['hushed'])")

            admin.setex(alive, 60, "held")  # its last word stands for the rest of the test, as just after the crash
            pending = carol.requests(status="pending")
            assert here.id in [r.id for r in pending] and list(pending.missing) == ["hushed"]
            alone = carol.requests("heard")
            assert [r.id for r in alone] == [here.id] and alone.missing == {} and repr(alone) == repr(list(alone))
            with local_grid.connect("carol", timeout=2) as hasty:  # asked alone: waited for, then NodeUnavailable
                with pytest.raises(NodeUnavailable, match="on 'hushed' is queued after 2 s"):
                    hasty.requests("hushed")

            # the shell: the rows it got, and a line naming the node
            env = {"GRIDQ_HOME": str(local_grid.home), "GRIDQ_BROKER": local_grid.url, "COLUMNS": "250"}
            shown = CliRunner().invoke(app, ["my-requests", "list", "-i", "carol"], env=env)
            assert shown.exit_code == 0, shown.output + repr(shown.exception)
            assert here.id in _table_ids(shown.stdout) and there.id not in shown.stdout
            note = ("not listed: hushed did not answer within 5 s (a node whose worker stopped in the last 20 s still "
                    "counts as up, or it is busy); --node NAME asks one alone and waits up to 30 s")
            assert shown.stderr.strip() == note
            as_json = CliRunner().invoke(app, ["my-requests", "list", "-i", "carol", "--json"], env=env)
            assert as_json.exit_code == 0, as_json.output
            assert here.id in [json.loads(line)["id"] for line in as_json.stdout.splitlines()]  # every line JSON
            assert as_json.stderr.strip() == note
        finally:
            admin.delete(alive)  # down now, as it would be 20 s on: later listings skip it at once
        carol.cancel_request(here.id)  # tidy up
