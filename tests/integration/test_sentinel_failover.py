"""A worker rides over a primary failover without losing a job.

A replicated broker on 127.0.0.1 — a primary, a replica and three sentinels, all over TLS
with their own users (Debian's redis-server: ``make redis``) — the gateway and the hospital's
node worker (a real Celery worker process) logged in through ``sentinels://`` URLs as their
own broker users, and a scientist's client as hers. Jobs are sent before and while the
sentinels switch the primary (``SENTINEL FAILOVER``); every one is answered, once, with its
own value.

What is guaranteed, and so tested (``protocol.broker``): Redis replicates asynchronously,
and a demoted primary still up takes writes until the sentinels repoint it (~10 s), which it
then drops. A job counts as sent only once a replica holds it (the client's LPUSH and a WAIT
on one connection, made again to the new primary when no replica confirms), and a result as
stored likewise before the worker acknowledges the job; a job delivered twice is answered
with the reply the node recorded. A job whose send did not return is not covered: its
sender is told (BrokerUnavailable naming the job)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.demo import prepare
from ops.local import LocalGrid
from ops.redis_servers import MASTER_NAME, sentinel_admin, tls_server_binary
from orchestrator.transport import redis_client
from protocol.broker import parse_broker
from protocol.messages import RawRelease, RunJob
from workers.storage.datasets import load_table

pytestmark = pytest.mark.integration

BEFORE = 6  # jobs sent before the failover
AFTER = 6  # jobs sent once the sentinels name the new primary (and all those in between)


@pytest.fixture(scope="module")
def ha_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    tls_server_binary()  # a clear failure, never a skip, if this machine has no redis-server with TLS
    home = tmp_path_factory.mktemp("ha-grid")
    configs = prepare(home)
    with LocalGrid(home, acl=True, sentinels=3) as lg:
        lg.start([configs[0]], timeout=90)
        yield lg


def primary(lg: LocalGrid) -> int:
    """The port of the server the sentinels name primary now."""
    with sentinel_admin(lg) as sentinel:
        host, port = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
    return int(port)


@pytest.mark.timeout(120)  # the grid's start (~15 s) and the test (well under 60 s)
def test_every_job_is_answered_once_across_a_primary_failover(ha_grid: LocalGrid) -> None:
    lg = ha_grid
    started = time.monotonic()
    table, _ = load_table(Path(lg.home) / "data" / "hospital_births_feb.csv")
    weights = table[:, 0]
    for role in ("node-hospital", "gateway", "scientist"):  # every participant reaches it through the sentinels
        url = parse_broker(lg.url_for(role))
        assert url.scheme == "sentinels" and url.master == MASTER_NAME and url.username == role
        assert url.wait_replicas == 1 and url.tls["ssl_ca_certs"].endswith("ca.crt")
    first = primary(lg)
    assert first == lg.ports["redis"]

    with lg.connect("alice", timeout=45) as grid:
        births = grid.search("#birth-records", "#february")["hospital"][0]

        def send(i: int):  # type: ignore[no-untyped-def]
            plan = (births["weight"] + float(i)).sum().plan
            return grid.submit("hospital", RunJob(plan=plan, release=RawRelease()))

        tickets = {i: send(i) for i in range(BEFORE)}
        with sentinel_admin(lg) as sentinel:
            assert sentinel.execute_command("SENTINEL", "FAILOVER", MASTER_NAME) in (b"OK", "OK", True)
        # on sending while the sentinels switch, and after: until the new primary is named, then AFTER more
        switched_at = None
        while switched_at is None or len(tickets) < switched_at + AFTER:
            tickets[len(tickets)] = send(len(tickets))
            if switched_at is None and primary(lg) != first:
                switched_at = len(tickets)
            assert time.monotonic() - started < 45, f"the sentinels did not switch ({len(tickets)} jobs sent)"
        assert primary(lg) == lg.ports["redis-replica"]

        answers = {i: t.value(timeout=max(1.0, 55 - (time.monotonic() - started))) for i, t in tickets.items()}
        for i, value in answers.items():
            expected = (weights + float(i)).sum()
            assert value.item() == pytest.approx(expected.item(), rel=1e-12), i
        raw = {i: grid.transport.result(t.id, 0.0) for i, t in tickets.items()}

    # once: the node recorded one reply per job, the very one its requester read
    node = lg.owner(Path(lg.home) / "nodes" / "hospital.toml")
    try:
        for i, ticket in tickets.items():
            row = node.store.job(ticket.id)
            assert row is not None and row.reply is not None, i
            found = raw[i]
            assert found is not None and found[1] == row.reply, i
    finally:
        node.close()

    # the new primary holds what was sent, confirmed by its replica: the old primary, repointed
    with redis_client(lg.url_for("admin"), socket_timeout=5) as admin:
        assert admin.info("replication")["role"] == "master"
        assert int(admin.info("commandstats").get("cmdstat_wait", {}).get("calls", 0)) > 0
    assert time.monotonic() - started < 60
