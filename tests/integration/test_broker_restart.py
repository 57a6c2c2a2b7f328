"""The broker going away (issue 15, part 6): jobs queued for a node survive a crash of
Redis (it keeps an append-only file), and while it is down every call a data scientist or
an owner makes fails at once with BrokerUnavailable — never a RuntimeError from Celery's
result backend, nor a redis or kombu exception, nor a wait of Celery's ~19 s retries.

These tests crash the broker, so they run on a grid of their own, not the shared one.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ops.demo import prepare
from ops.local import LocalGrid
from orchestrator import Grid
from protocol.contract import node_queue
from protocol.errors import BrokerUnavailable
from protocol.messages import RawRelease, RunJob
from workers.storage.datasets import load_table


@pytest.fixture(scope="module")
def lg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    home = tmp_path_factory.mktemp("restart")
    configs = prepare(home)
    with LocalGrid(home) as grid:
        grid.start(configs[:1])  # the gateway and the hospital
        yield grid


def hospital(lg: LocalGrid) -> Path:
    return lg.home / "nodes" / "hospital.toml"


def weights(lg: LocalGrid) -> torch.Tensor:
    return load_table(lg.home / "data" / "hospital_births_feb.csv")[0][:, 0]


def raw_sum(grid: Grid, rows: int) -> Any:
    """A ticket on the exact sum of the first ``rows`` weights (alice may see them raw)."""
    births = grid.search("#birth-records", "#february")["hospital"][0]
    return grid.submit("hospital", RunJob(plan=births["weight"][:rows].sum().plan, release=RawRelease()))


def test_jobs_queued_for_a_stopped_node_survive_a_broker_crash(lg: LocalGrid) -> None:
    expected = weights(lg)
    with lg.connect("alice", timeout=90) as grid:
        lg.kill("hospital")  # its worker dies without a word: until its liveness key expires (ALIVE_TTL_SECONDS)
        # jobs are still sent to it, and wait in its queue
        tickets = {rows: raw_sum(grid, rows) for rows in (1, 2, 3, 5, 8)}
        assert grid.transport.queue_length(node_queue("hospital")) == len(tickets)
        # appendfsync everysec: each write reaches the OS before Redis answers it, so a crash of
        # Redis alone loses none; the pause covers the rare write Redis postpones behind a slow fsync
        time.sleep(1.5)
        lg.restart_redis(signal.SIGKILL)
        assert grid.transport.queue_length(node_queue("hospital")) == len(tickets), "the queue did not survive"
        lg.start_node(hospital(lg))
        for rows, ticket in tickets.items():  # the same client, across the broker's restart
            assert torch.allclose(ticket.value(timeout=90), expected[:rows].sum(), rtol=1e-6), rows
        assert grid.transport.queue_length(node_queue("hospital")) == 0


def test_every_call_on_a_dead_broker_is_broker_unavailable_and_quick(lg: LocalGrid, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    owner = lg.owner(hospital(lg))
    monkeypatch.setenv("GRIDQ_HOME", str(tmp_path))  # Grid.connect without a key pins here
    grid = lg.connect("alice", timeout=30)
    try:
        births = grid.search("#birth-records", "#february")["hospital"][0]
        lg.kill("hospital")
        waiting = births["weight"].sum().submit()  # no worker (its liveness key not yet expired): it stays queued
        lg.kill("redis")
        calls: dict[str, Callable[[], object]] = {
            "Grid.connect with the grid's key": lambda: lg.connect("bob", timeout=5),
            "Grid.connect, pinning": lambda: Grid.connect(lg.url, lg.keys / "bob.key", timeout=5),
            "grid.search": lambda: grid.search("#birth-records"),
            "pointer.submit": lambda: births["weight"].mean().submit(),
            "pointer.get": lambda: births["weight"].mean().get(timeout=5),
            "ticket.status": lambda: waiting.status,
            "ticket.wait": lambda: waiting.wait(timeout=5),
            "ticket.result": lambda: waiting.result(timeout=5),
            "grid.ticket(id).wait": lambda: grid.ticket(waiting.id).wait(timeout=5),
            "Node.publish": lambda: owner.publish("scratch", torch.ones(3, 2), bounds=(0.0, 2.0), replace=True),
            "Node.register": owner.register,
            "Node.unpublish": lambda: owner.unpublish("scratch"),
            "Node.approve": lambda: owner.approve("hospital:" + "0" * 32),
            "Node.deny": lambda: owner.deny("hospital:" + "0" * 32, "no"),
        }
        wrong = {}
        for name, call in calls.items():
            started = time.monotonic()
            try:
                call()
                wrong[name] = "no error"
            except BrokerUnavailable as exc:
                took = time.monotonic() - started
                if took > 10:
                    wrong[name] = f"BrokerUnavailable only after {took:.1f} s"
                elif "Is Redis running there?" not in str(exc):
                    wrong[name] = f"a message that names no fix: {exc}"
            except Exception as exc:  # noqa: BLE001 - what leaked is the finding
                wrong[name] = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
        assert not wrong, wrong
        assert not (tmp_path / "known_gateways").exists()  # nothing pinned from a broker that did not answer
    finally:
        if "redis" not in lg.procs:
            lg.start_redis(lg.port)
        if "hospital" not in lg.procs:
            lg.start_node(hospital(lg))
    # the broker is back (with what it held): the same connection and ticket carry on
    assert waiting.wait(timeout=90).status == "done"
    grid.close()
    owner.close()
