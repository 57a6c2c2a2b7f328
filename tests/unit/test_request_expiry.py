"""Requests that end without the owner: expired past ``[approval] expire_after`` (on an
injected clock), cancelled by their requester (and only by them), each answered with its
typed error; and the requester's own view of the queue through the node's JobRunner."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from pydantic import ValidationError

import workers.policy.approvals as approvals
from protocol.contract import Tasks
from protocol.envelope import MemoryNonceStore, open_envelope, seal_envelope
from protocol.errors import (
    InvalidRequest,
    JobCancelled,
    NotFound,
    PermissionDenied,
    RequestDenied,
    RequestExpired,
    error_from_wire,
)
from protocol.identity import Identity
from protocol.messages import CancelRequest, DatasetMeta, JobReply, MyRequests, RawRelease, RunJob
from protocol.plan import InputRef, Plan, Ref, Step
from workers.config import ApprovalSection, BudgetSection
from workers.jobs.context import NodeContext
from workers.jobs.runner import JobRunner
from workers.policy.approvals import Parked, Requests, refusal, sweep_every
from workers.policy.ledger import Ledger
from workers.storage.store import Store

WEEK = 7 * 24 * 3600.0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(approvals, "time", SimpleNamespace(time=lambda: now[0]))
    return now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path, f"sqlite:///{tmp_path / 'node.db'}")
    yield s
    s.close()


def park(queue: Requests, job_id: str, requester: str = "carol") -> None:
    queue.park(job_id, requester, {}, Parked("raw", ["births"], "v1 = mean(v0)", "raw"))


def test_the_setting_has_a_sane_default_and_refuses_negatives() -> None:
    assert ApprovalSection().expire_after == WEEK
    assert ApprovalSection(expire_after=0).expire_after == 0  # never
    with pytest.raises(ValidationError):
        ApprovalSection(expire_after=-1)
    assert sweep_every(WEEK) == 60.0 and sweep_every(2.0) == 0.5 and sweep_every(0) == 60.0


def test_an_undecided_request_expires_at_its_deadline(store: Store, clock: list[float]) -> None:
    queue = Requests(store, expire_after=10)
    park(queue, "ward:a1")
    (pending,) = queue.list()
    assert queue.info(pending).expires_at == 1010.0 and queue.info(pending).status == "pending"
    assert queue.expire_due(now=1009.9) == []
    (expired,) = queue.expire_due(now=1030.0)
    row = queue.get("ward:a1")
    assert (row.status, row.decided_at) == ("expired", 1010.0)  # closed at its deadline, whenever the sweep came
    assert "expire_after" in row.decision and queue.list() == [] and queue.info(row).expires_at is None
    with pytest.raises(InvalidRequest, match=r"expired at 1970-01-01T00:16:50Z .* may send the work again"):
        queue.decide("ward:a1", "approved")
    error = refusal(row, "ward")
    assert isinstance(error, RequestExpired) and isinstance(error, RequestDenied) and error.job_id == "ward:a1"
    assert "Send the work again" in error.message
    assert type(error_from_wire(error.to_wire())) is RequestExpired  # the scientist's ticket raises the same type


def test_deciding_past_the_deadline_expires_the_request_instead(store: Store, clock: list[float]) -> None:
    queue = Requests(store, expire_after=10)
    park(queue, "ward:a1")
    clock[0] = 1010.5  # no sweep came: the owner's decision finds it late
    with pytest.raises(InvalidRequest, match="expired"):
        queue.decide("ward:a1", "approved")
    assert queue.get("ward:a1").status == "expired"  # recorded, although the decision raised
    with pytest.raises(InvalidRequest, match="expired"):
        queue.cancel("ward:a1", "carol")


def test_without_expiry_requests_wait_forever(store: Store, clock: list[float]) -> None:
    queue = Requests(store, expire_after=0)
    park(queue, "ward:a1")
    clock[0] = 1e12
    assert queue.expire_due() == [] and queue.info(queue.get("ward:a1")).expires_at is None
    assert queue.decide("ward:a1", "approved").status == "approved"


def test_only_its_requester_cancels_a_pending_request(store: Store, clock: list[float]) -> None:
    queue = Requests(store, expire_after=WEEK)
    park(queue, "ward:alice1", "alice")
    park(queue, "ward:bob1", "bob")
    with pytest.raises(PermissionDenied, match="not 'alice''s"):
        queue.cancel("ward:bob1", "alice")
    assert queue.get("ward:bob1").status == "pending"
    with pytest.raises(NotFound):
        queue.cancel("ward:nope", "alice")
    clock[0] = 1005.0
    cancelled = queue.cancel("ward:alice1", "alice")
    assert (cancelled.status, cancelled.decided_at, cancelled.decision) == ("cancelled", 1005.0, "cancelled by alice")
    assert queue.cancel("ward:alice1", "alice").status == "cancelled"  # again: no error
    assert [r.job_id for r in queue.list()] == ["ward:bob1"]  # off the owner's queue
    with pytest.raises(InvalidRequest, match="cancelled by its requester, 'alice'"):
        queue.decide("ward:alice1", "approved")
    assert isinstance(refusal(cancelled, "ward"), JobCancelled)
    queue.decide("ward:bob1", "denied", "no")
    with pytest.raises(InvalidRequest, match="already denied"):
        queue.cancel("ward:bob1", "bob")
    assert [r.job_id for r in queue.list(None, requester="alice")] == ["ward:alice1"]
    with pytest.raises(InvalidRequest, match="not 'maybe'"):
        queue.list("maybe")


def test_closed_requests_are_unanswered_until_their_refusal_is_recorded(store: Store, clock: list[float]) -> None:
    queue = Requests(store, expire_after=10)
    for job_id in ("ward:a1", "ward:a2", "ward:a3"):
        clock[0] += 1  # arrival order is created_at's
        store.begin_job(job_id, "carol")
        store.finish_job(job_id, "pending_approval", {"parked": True})
        park(queue, job_id)
    queue.cancel("ward:a2", "carol")
    queue.decide("ward:a3", "denied", "no")  # the owner's: Node.deny answers it at once
    assert [r.job_id for r in queue.unanswered()] == ["ward:a2"]
    queue.expire_due(now=2000.0)
    assert [r.job_id for r in queue.unanswered()] == ["ward:a1", "ward:a2"]
    store.finish_job("ward:a1", "denied", {"refused": True})
    assert [r.job_id for r in queue.unanswered()] == ["ward:a2"]


# --- the requester's own view, through the node's JobRunner ------------------------------------

NODE = Identity.generate("ward")
ALICE, BOB = Identity.generate("alice"), Identity.generate("bob")
MEAN = Plan(inputs=[InputRef(kind="dataset", name="births")], steps=[Step(op="mean", args=[Ref(ref=0)], params={})])


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[tuple[JobRunner, dict[str, Any]]]:
    store = Store(tmp_path / "store", f"sqlite:///{tmp_path / 'runner.db'}")
    store.put_dataset(DatasetMeta(node="ward", name="births", shape=(2, 2), dtype="float64"),
                      torch.ones(2, 2, dtype=torch.float64), [], None)
    delivered: dict[str, Any] = {}
    context = NodeContext("ward", NODE, {"alice": ALICE.public, "bob": BOB.public}, store,
                          Ledger(store, "ward", BudgetSection()), ApprovalSection(default="manual", expire_after=WEEK),
                          lambda data: "k", lambda key: b"", lambda name: pytest.fail(name))
    yield JobRunner(context, deliver=delivered.__setitem__), delivered
    store.close()


def ask(runner: JobRunner, body: Any, sender: Identity, job_id: str) -> JobReply:
    env = seal_envelope(sender, recipient="ward", kind=body.kind, job_id=job_id, body=body.model_dump(mode="json"),
                        now=time.time())
    return read(runner.answer(Tasks.RUN_JOB, env.model_dump(mode="json"), job_id).signed, sender.name)


def read(signed: dict[str, Any], reader: str) -> JobReply:
    env = open_envelope(signed, recipient=reader, keyring={"ward": NODE.public}, nonces=MemoryNonceStore(),
                        delivery_id="d", now=time.time())
    return JobReply.model_validate(env.body_json())


def test_a_requester_lists_and_cancels_only_their_own(runner: tuple[JobRunner, dict[str, Any]]) -> None:
    jobs, delivered = runner
    raw = RunJob(plan=MEAN, release=RawRelease())
    assert ask(jobs, raw, ALICE, "ward:alice-1").status == "pending_approval"
    assert ask(jobs, raw, ALICE, "ward:alice-2").status == "pending_approval"
    assert ask(jobs, raw, BOB, "ward:bob-1").status == "pending_approval"
    mine = ask(jobs, MyRequests(), ALICE, "ward:list-1")
    assert [(r.id, r.status, r.kind, r.datasets) for r in mine.requests] == [
        ("ward:alice-1", "pending", "raw", ["births"]), ("ward:alice-2", "pending", "raw", ["births"])]
    assert all(r.expires_at == pytest.approx(r.created_at + WEEK) for r in mine.requests)

    refused = ask(jobs, CancelRequest(request="ward:bob-1"), ALICE, "ward:cancel-1")
    assert refused.status == "denied" and refused.error is not None and refused.error.code == "permission_denied"
    assert "ward:bob-1" not in delivered and jobs.requests.get("ward:bob-1").status == "pending"

    done = ask(jobs, CancelRequest(request="ward:alice-1"), ALICE, "ward:cancel-2")
    assert done.status == "done" and [(r.id, r.status) for r in done.requests] == [("ward:alice-1", "cancelled")]
    answer = read(delivered["ward:alice-1"], "alice")  # what her ticket reads: signed, JobCancelled
    assert answer.error is not None and type(error_from_wire(answer.error.model_dump())) is JobCancelled
    assert [r.job_id for r in jobs.requests.list()] == ["ward:alice-2", "ward:bob-1"]  # the owner's queue

    pending = ask(jobs, MyRequests(status="pending"), ALICE, "ward:list-2")
    assert [r.id for r in pending.requests] == ["ward:alice-2"]
    assert [r.id for r in ask(jobs, MyRequests(status="cancelled"), ALICE, "ward:list-3").requests] == ["ward:alice-1"]
    assert [r.id for r in ask(jobs, MyRequests(), BOB, "ward:list-4").requests] == ["ward:bob-1"]


def test_listing_closes_what_has_expired_and_tells_its_requester(runner: tuple[JobRunner, dict[str, Any]]) -> None:
    jobs, delivered = runner
    jobs.requests.expire_after = 0.3
    assert ask(jobs, RunJob(plan=MEAN, release=RawRelease()), BOB, "ward:bob-1").status == "pending_approval"
    time.sleep(0.4)
    (listed,) = ask(jobs, MyRequests(), BOB, "ward:list").requests
    assert listed.status == "expired" and listed.decided_at is not None
    answer = read(delivered["ward:bob-1"], "bob")
    assert answer.status == "denied" and answer.error is not None and answer.error.code == "request_expired"
