"""The owner's approval queue on a manual-approval node: parked jobs wait, approval from the
CLI completes the scientist's ticket, a denial reaches her with its reason, an access request
makes her an allowed user, and pending requests survive a worker restart."""

from __future__ import annotations

import time

import pytest
import torch
from typer.testing import CliRunner

from ops.cli import app
from ops.local import LocalGrid
from protocol.errors import ApprovalRequired, RequestDenied


def _settled(ticket, timeout: float = 30.0) -> str:  # type: ignore[no-untyped-def]
    """The ticket's status once the node has taken the job (it is queued until then)."""
    deadline = time.monotonic() + timeout
    while (status := ticket.status) in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.02)
    return status


def owner(local_grid: LocalGrid, config, *args: str) -> str:  # type: ignore[no-untyped-def]
    env = {"GRIDQ_HOME": str(local_grid.home), "GRIDQ_BROKER": local_grid.url, "COLUMNS": "250"}
    result = CliRunner().invoke(app, ["requests", *args[:1], str(config), *args[1:]], env=env)
    assert result.exit_code == 0, result.output
    return result.output


def test_parked_jobs_wait_and_the_owner_decides(local_grid: LocalGrid, ward, births_feb):
    with local_grid.connect("alice") as alice:
        mine = alice.search("#ward")["ward"][0]
        assert torch.equal(mine["weight"].mean().get(), births_feb[:, 0].mean())  # auto: her own data
    with local_grid.connect("carol") as grid:
        births = grid.search("#ward")["ward"][0]
        dp_ticket = births["weight"].mean().submit(epsilon=0.5)
        raw_ticket = births["height"].max().submit()  # compute is not automatic here either
        assert _settled(dp_ticket) == "pending_approval" and _settled(raw_ticket) == "pending_approval"
        with pytest.raises(ApprovalRequired, match="waits for the approval"):
            dp_ticket.wait(timeout=1)
        listing = owner(local_grid, ward, "list")
        assert dp_ticket.id in listing and raw_ticket.id in listing and "carol" in listing
        shown = owner(local_grid, ward, "show", dp_ticket.id)
        assert "dp (ε=0.5)" in shown and "mean(" in shown and "ward-births" in shown
        owner(local_grid, ward, "approve", dp_ticket.id)
        value = dp_ticket.private_value(timeout=30)
        assert value.noise.epsilon == pytest.approx(0.5)
        owner(local_grid, ward, "deny", raw_ticket.id, "--reason", "not for this study")
        with pytest.raises(RequestDenied, match="not for this study"):
            raw_ticket.wait(timeout=30)
        assert raw_ticket.status == "denied"
        assert dp_ticket.id not in owner(local_grid, ward, "list")  # decided: off the queue


def test_access_request_survives_a_restart_and_makes_an_allowed_user(local_grid: LocalGrid, ward, births_feb):
    with local_grid.connect("carol") as grid:
        births = grid.search("#ward")["ward"][0]
        access = births.request_access("PhD thesis on birth weight; ethics approval 2026-117")
        assert _settled(access) == "pending_approval"
        local_grid.kill("ward")  # the worker dies with the request pending …
        local_grid.start_node(ward, "ward")
        local_grid.wait_ready(["ward"])
        shown = owner(local_grid, ward, "show", access.id)  # … which is still there
        assert "ethics approval 2026-117" in shown and "access" in shown
        owner(local_grid, ward, "approve", access.id)
        assert access.wait(timeout=30).status == "done"
        assert torch.equal(births["weight"].mean().get(), births_feb[:, 0].mean())  # now she may
        local_grid.kill("ward")  # issue 16: a restart publishes the config's datasets again …
        local_grid.start_node(ward, "ward")
        local_grid.wait_ready(["ward"])
        assert torch.equal(births["height"].mean().get(), births_feb[:, 1].mean())  # … and the grant holds
    assert "approved" in owner(local_grid, ward, "list", "--all")


def test_a_decision_and_the_job_it_resumes_never_come_apart(local_grid: LocalGrid, ward, births_feb,
                                                           monkeypatch: pytest.MonkeyPatch):
    """Issue 16: the broker fails between the owner's decision and its answer. The decision
    stands; approving again sends the answer, and so does the node's next start."""
    import redis

    from protocol.errors import BrokerUnavailable
    from workers import Node

    monkeypatch.setenv("GRIDQ_HOME", str(local_grid.home))
    monkeypatch.setenv("GRIDQ_BROKER", local_grid.url)
    with local_grid.connect("alice") as grid:  # an allowed user: her kept results come back raw
        births = grid.search("#ward")["ward"][0]
        first, second = births["weight"].sum().submit(), births["height"].sum().submit()
        assert _settled(first) == "pending_approval" and _settled(second) == "pending_approval"
        node = Node.from_config(ward)
        try:
            def broker_gone(*args: object, **kwargs: object) -> None:
                raise redis.ConnectionError("Connection refused")

            for ticket in (first, second):
                with monkeypatch.context() as m:
                    m.setattr(node.app.backend, "store_result", broker_gone)
                    with pytest.raises(BrokerUnavailable):
                        node.approve(ticket.id)
            assert {r.job_id: r.status for r in node.requests(None)}[first.id] == "approved"
            with pytest.raises(ApprovalRequired):
                first.wait(timeout=2)  # decided, but its answer never left
            node.approve(first.id)  # approving again sends it
        finally:
            node.close()
        assert torch.equal(first.result(timeout=30).get(), births_feb[:, 0].sum())
        local_grid.kill("ward")  # the other one: the node's next start sends it
        local_grid.start_node(ward, "ward")
        local_grid.wait_ready(["ward"])
        assert torch.equal(second.result(timeout=30).get(), births_feb[:, 1].sum())


def test_a_waiting_job_stays_waiting_past_a_day_and_a_decision_is_never_overwritten(
        local_grid: LocalGrid, ward, monkeypatch: pytest.MonkeyPatch):
    """The word that a job waits (a signed envelope, valid a day at most) is signed again by
    the node's sweep while the owner takes longer (a week by default): the ticket keeps
    reading ``pending_approval``; once decided, a sweep never puts the word back."""
    from protocol.envelope import MAX_TTL_SECONDS, Envelope
    from workers import Node

    monkeypatch.setenv("GRIDQ_HOME", str(local_grid.home))
    monkeypatch.setenv("GRIDQ_BROKER", local_grid.url)
    node = Node.from_config(ward)  # the owner's admin API
    with local_grid.connect("carol") as grid:
        births = grid.search("#ward")["ward"][0]
        ticket = births["weight"].sum().submit()
        assert _settled(ticket) == "pending_approval"
        first = Envelope.model_validate(grid.transport.parked(ticket.id))
        assert first.expires_at - first.issued_at == MAX_TTL_SECONDS

        assert node.refresh_parked() == 0  # far from expiring: left alone
        time.sleep(1.1)
        assert node.refresh_parked(within=MAX_TTL_SECONDS) >= 1  # as the sweep does half a day before it expires
        again = Envelope.model_validate(grid.transport.parked(ticket.id))
        assert again.expires_at > first.expires_at and again.body_json()["status"] == "pending_approval"
        assert node.store.job(ticket.id).reply == grid.transport.parked(ticket.id)  # a redelivery answers the same
        assert grid.ticket(ticket.id).status == "pending_approval"

        node.approve(ticket.id)
        assert ticket.wait(timeout=30).status == "done"
        assert node.runner().repark(ticket.id, "carol") is None  # a sweep that read it as waiting loses the race
        node.refresh_parked(within=MAX_TTL_SECONDS)
        assert grid.ticket(ticket.id).status == "done"
        assert grid.transport.parked(ticket.id) is None
    node.close()
