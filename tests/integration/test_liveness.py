"""Liveness (issue 16, part 2): a node whose worker stops leaves search and a job for it
fails at once with NodeUnavailable — at once when it stops cleanly, within the liveness
key's lifetime when it is killed without a word — and it is back when it starts again."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.local import LocalGrid
from protocol.contract import ALIVE_TTL_SECONDS
from protocol.errors import NodeUnavailable

CONFIG = """
[node]
id = "annexe"
broker = "${GRIDQ_BROKER}"
store = "${GRIDQ_HOME}/annexe"
identity = "${GRIDQ_HOME}/keys/annexe.key"

[users.alice]
public_key_file = "${GRIDQ_HOME}/keys/alice.pub"

[[datasets]]
name = "annexe-births"
path = "${GRIDQ_HOME}/data/hospital_births_feb.csv"
tags = ["#annexe"]
allowed_users = ["alice"]
"""


@pytest.fixture()
def annexe(local_grid: LocalGrid) -> Iterator[Path]:
    config = local_grid.home / "annexe.toml"
    config.write_text(CONFIG)
    local_grid.start_node(config, "annexe")
    local_grid.wait_ready(["annexe"])
    yield config
    if "annexe" in local_grid.procs:
        local_grid.stop_worker("annexe")


def _listed(grid, within: float, expected: bool) -> float:  # type: ignore[no-untyped-def]
    """Seconds until search lists the annexe (or not), at most ``within``."""
    started = time.monotonic()
    while ("annexe" in grid.search("#annexe")) != expected:
        assert time.monotonic() - started < within, f"search still {'lacks' if expected else 'lists'} the annexe"
        time.sleep(0.2)
    return time.monotonic() - started


def test_a_stopped_node_leaves_search_and_jobs_for_it_fail_at_once(local_grid: LocalGrid, annexe: Path):
    with local_grid.connect("alice") as grid:
        (births,) = grid.search("#annexe")["annexe"]
        assert births.sum().submit().wait(timeout=30).status == "done"

        local_grid.kill("annexe", signal.SIGTERM)  # stopped cleanly: it says so as it goes
        assert _listed(grid, 5, expected=False) < 5
        started = time.monotonic()
        with pytest.raises(NodeUnavailable, match=r"no worker of 'annexe' serves node\.annexe .*gridq node start"):
            births.mean().submit()
        assert time.monotonic() - started < 2

        local_grid.start_node(annexe, "annexe")  # back: listed, and served
        local_grid.wait_ready(["annexe"])
        _listed(grid, 30, expected=True)
        (births,) = grid.search("#annexe")["annexe"]
        assert births.sum().submit().wait(timeout=30).status == "done"

        local_grid.kill("annexe")  # SIGKILL: no word; its key expires
        gone = _listed(grid, ALIVE_TTL_SECONDS + 10, expected=False)
        assert gone <= ALIVE_TTL_SECONDS + 10
        with pytest.raises(NodeUnavailable):
            births.mean().submit()
