"""What a node leaves in the result backend expires when its signed answer would (the node's
``[retention] results``, RESULT_TTL_SECONDS by default), not a day later — except a parked
job's state, which waits for the owner's decision however long that takes."""

from __future__ import annotations

import time

import redis
from typer.testing import CliRunner

from ops.cli import app
from ops.local import LocalGrid
from protocol.contract import RESULT_TTL_SECONDS
from protocol.messages import RawRelease, RunJob


def _ttl(local_grid: LocalGrid, job_id: str) -> int:
    with redis.Redis.from_url(local_grid.url) as client:
        return int(client.ttl(f"celery-task-meta-{job_id}"))


def _parked(ticket, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while ticket.status != "pending_approval":
        assert time.monotonic() < deadline, ticket.status
        time.sleep(0.02)


def test_answers_expire_with_their_reply_and_parked_jobs_wait(local_grid: LocalGrid, ward) -> None:  # type: ignore[no-untyped-def]
    with local_grid.connect("alice") as alice:
        mean = alice.search("#ward")["ward"][0]["weight"].mean()
        ticket = alice.submit("ward", RunJob(plan=mean.plan, release=RawRelease()))  # her own data: answered at once
        ticket.wait(timeout=30)
        assert 0 < _ttl(local_grid, ticket.id) <= RESULT_TTL_SECONDS
    with local_grid.connect("carol") as carol:
        parked = carol.search("#ward")["ward"][0]["height"].max().submit()
        _parked(parked)
        assert _ttl(local_grid, parked.id) == -1  # no expiry while it waits
        env = {"GRIDQ_HOME": str(local_grid.home), "GRIDQ_BROKER": local_grid.url}
        result = CliRunner().invoke(app, ["requests", "deny", str(ward), parked.id, "--reason", "no"], env=env)
        assert result.exit_code == 0, result.output
        assert parked.status == "denied"
        assert 0 < _ttl(local_grid, parked.id) <= RESULT_TTL_SECONDS  # decided: the answer's TTL
