"""``ticket.cancel()`` with real workers, on a broker with one ACL user per identity (issue
19, point 3): a node busy with a slow job, a second job queued behind it, cancelled — it
never runs (no result kept at the node), its ticket says ``cancelled`` at once and the
node's signed answer says so when it reaches the job. A started or finished job is refused
with ``CannotCancel`` saying which; a cancellation someone else signed is ignored by the
node. The grid's broker logs no ACL denial meanwhile."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from ops.demo import prepare
from ops.local import LocalGrid
from protocol.cancel import STARTED, cancellation, cancelled_by, signer
from protocol.envelope import Envelope
from protocol.errors import CannotCancel, JobCancelled
from protocol.identity import Identity
from workers.storage.store import Store

CONFIG = """
[node]
id = "desk"
broker = "${GRIDQ_BROKER}"
store = "${GRIDQ_HOME}/desk"
identity = "${GRIDQ_HOME}/keys/desk.key"

[users.alice]
public_key_file = "${GRIDQ_HOME}/keys/alice.pub"
[users.carol]
public_key_file = "${GRIDQ_HOME}/keys/carol.pub"

[approval.users.carol]
auto = []                  # carol's jobs wait for the owner

[worker]
concurrency = 1            # one job at a time: while the slow one runs, the next waits in the queue
time_limit = 90

[[datasets]]
name = "square"
path = "${GRIDQ_HOME}/data/desk_square.npy"
tags = ["#desk"]
allowed_users = ["alice", "carol"]
"""

SIZE, ROUNDS = 1536, 40  # a few seconds of matrix products at the node


@pytest.fixture(scope="module")
def desk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalGrid, Store]]:
    home = tmp_path_factory.mktemp("cancel-grid")
    prepare(home)  # keys and data
    rng = np.random.default_rng(0)
    np.save(home / "data" / "desk_square.npy", rng.random((SIZE, SIZE), dtype=np.float32) / SIZE)
    config = home / "desk.toml"
    config.write_text(CONFIG)
    with LocalGrid(home, acl=True) as lg:
        lg.start([])  # the broker and the gateway
        lg.start_node(config, "desk")
        lg.wait_ready(["desk"])
        store = Store(home / "desk", f"sqlite:///{home / 'desk' / 'node.db'}")
        yield lg, store
        store.close()


@pytest.fixture()
def no_denials(desk: tuple[LocalGrid, Store]) -> Iterator[None]:
    """Fails the test if Redis logged an ACL denial: the scientist's cancel and the node's
    take-up each need their rule (ops/acl.py)."""
    admin = redis.Redis.from_url(desk[0].url_for("admin"))
    admin.acl_log_reset()
    yield
    denied = [(e["username"], e["reason"], e["object"]) for e in admin.acl_log(128)]
    admin.close()
    assert denied == [], f"ACL denials: {denied}"


def _slow(x):  # type: ignore[no-untyped-def]
    slow = x
    for _ in range(ROUNDS):
        slow = (slow @ x).clamp(-1.0, 1.0)
    return slow.sum()


def _until_running(store: Store, job_id: str) -> None:
    deadline = time.monotonic() + 60
    while (job := store.job(job_id)) is None or job.status != "running":
        assert time.monotonic() < deadline, "the slow job never started"
        time.sleep(0.02)


def _until_answered(grid, job_id: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 90
    while grid.transport.result(job_id) is None:
        assert time.monotonic() < deadline, f"the node never answered {job_id}"
        time.sleep(0.1)


def test_a_queued_job_cancelled_never_runs_and_its_ticket_says_so(desk, no_denials) -> None:  # type: ignore[no-untyped-def]
    lg, store = desk
    with lg.connect("alice", timeout=90) as grid:
        x = grid.search("#desk")["desk"][0]
        slow = _slow(x).submit()
        _until_running(store, slow.id)
        queued = x.sum().submit()  # behind the slow job: the node runs one job at a time
        assert queued.status == "queued"

        started = time.monotonic()
        assert queued.cancel() is queued
        assert queued.status == "cancelled"
        with pytest.raises(JobCancelled, match=f"you cancelled job {queued.id} before 'desk' ran it: it did not "
                                               "run"):
            queued.result()
        assert time.monotonic() - started < 5  # at once, not when the node is free again
        assert store.job(slow.id).status == "running" and store.job(queued.id) is None  # still busy; not taken up
        assert queued.cancel() is queued  # again: nothing more happens
        with lg.connect("alice") as elsewhere:  # picked up again, before the node has answered
            assert elsewhere.ticket(queued.id).status == "cancelled"

        with pytest.raises(CannotCancel, match=f"job {slow.id} has already started at 'desk'; a running job is not "
                                               r"stopped halfway. Wait for it \(ticket.wait\(\)\)"):
            slow.cancel()
        assert slow.result(timeout=90).shape == ()
        with pytest.raises(CannotCancel, match=rf"job {slow.id} has already finished at 'desk' \(done\): there is "
                                               r"nothing left to cancel; its result is there"):
            slow.cancel()

        # the node reaches the cancelled job once the slow one is done: a signed answer, nothing run
        _until_answered(grid, queued.id)
        answered = grid.ticket(queued.id)
        assert answered.status == "cancelled"
        with pytest.raises(JobCancelled, match="alice cancelled this job before 'desk' started it: it did not run"):
            answered.wait()
        assert queued.cancel() is queued  # the node's answer is a cancellation: nothing to refuse
    job = store.job(queued.id)
    assert job is not None and job.attempts == 1 and job.status == "failed"
    assert Envelope.model_validate(job.reply).body_json()["error"]["code"] == "job_cancelled"
    assert store.count_objects(queued.id) == 0  # it never ran: no result kept
    assert store.count_objects(slow.id) == 1


def test_a_cancellation_someone_else_signed_is_ignored_and_the_job_runs(desk, no_denials) -> None:  # type: ignore[no-untyped-def]
    lg, store = desk
    with lg.connect("alice", timeout=90) as grid, lg.connect("carol") as mallory:
        x = grid.search("#desk")["desk"][0]
        slow = _slow(x).submit()
        _until_running(store, slow.id)
        target = x.mean().submit()
        # carol learned the job's id and writes her own cancellation first (the broker user is shared)
        assert mallory.transport.cancel(target.id, cancellation(mallory.identity, target.id)) is None
        assert target.status == "queued"  # not alice's cancellation: her ticket is not cancelled
        with pytest.raises(CannotCancel, match=f"job {target.id} has a mark on the broker that is not yours "
                                               r"\(a cancellation signed as 'carol'\)"):
            target.cancel()
        assert target.result(timeout=90).shape == ()  # the node ignored it: the job ran
        assert target.status == "done"
    assert store.count_objects(target.id) == 1


def test_a_job_that_finished_is_refused_and_one_never_sent_is_not_found(desk, no_denials) -> None:  # type: ignore[no-untyped-def]
    from protocol.errors import NotFound

    lg, _ = desk
    with lg.connect("alice", timeout=90) as grid:
        x = grid.search("#desk")["desk"][0]
        done = x[0, 0].submit()
        done.wait()
        with pytest.raises(CannotCancel, match=r"has already finished at 'desk' \(done\)"):
            done.cancel()
        from orchestrator.ticket import JobTicket

        with pytest.raises(NotFound, match="was never sent on this broker"):
            JobTicket(grid, "desk:" + "0" * 32).cancel()


def test_a_job_waiting_for_approval_is_withdrawn_from_the_owners_queue(desk, no_denials) -> None:  # type: ignore[no-untyped-def]
    lg, store = desk
    with lg.connect("carol", timeout=30) as grid:
        x = grid.search("#desk")["desk"][0]
        parked = x.sum().submit()
        deadline = time.monotonic() + 60
        while parked.status != "pending_approval":
            assert time.monotonic() < deadline, f"the job was never parked: {parked.status}"
            time.sleep(0.05)
        assert parked.cancel() is parked  # not in the node's job queue: withdrawn from the owner's
        assert parked.status == "cancelled"
        with pytest.raises(JobCancelled):
            parked.wait(timeout=30)
        assert [r.status for r in grid.requests("desk") if r.id == parked.id] == ["cancelled"]
        assert parked.cancel() is parked
    assert store.count_objects(parked.id) == 0


def test_a_node_that_cannot_check_for_a_cancellation_does_not_run_the_job(desk) -> None:  # type: ignore[no-untyped-def]
    """Fails closed: the node's broker user without its rule for the cancel keys (an ACL
    not brought up to date), a job is refused with a retryable NodeUnavailable saying why,
    and nothing of it runs; with the rule back, the same plan runs."""
    import re

    from ops.acl import node_user
    from protocol.errors import NodeUnavailable

    lg, store = desk
    user = node_user("desk")
    with redis.Redis.from_url(lg.url_for("admin"), decode_responses=True) as admin:
        line = next(u for u in admin.acl_list() if u.split()[1] == user)
        tokens = re.findall(r"\([^)]*\)|\S+", line)[2:]  # after "user <name>": flags, #hashes, rules, (selectors)
        admin.execute_command("ACL", "SETUSER", user, "reset", *(t for t in tokens if "gridq:cancel:" not in t))
        try:
            with lg.connect("alice", timeout=60) as grid:
                x = grid.search("#desk")["desk"][0]
                refused = x.sum().submit()
                with pytest.raises(NodeUnavailable, match="could not check on the broker whether this job was "
                                                          "cancelled .*so it did not run it: send it again"):
                    refused.result(timeout=60)
                assert store.count_objects(refused.id) == 0
        finally:
            admin.execute_command("ACL", "SETUSER", user, "reset", *tokens)
    with lg.connect("alice", timeout=60) as grid:
        assert grid.search("#desk")["desk"][0][0, 0].get().shape == ()


def test_a_cancellation_verifies_only_for_its_job_and_its_signer(tmp_path: Path) -> None:
    alice, carol = Identity.generate("alice"), Identity.generate("carol")
    mark = cancellation(alice, "desk:1")
    assert cancelled_by(mark, alice.public, "desk:1") and signer(mark) == "alice"
    assert not cancelled_by(mark, alice.public, "desk:2")  # another job
    assert not cancelled_by(mark, carol.public, "desk:1")  # another signer
    forged = mark.replace(b"alice", b"carol")  # a name swapped in: carol's key does not verify alice's signature
    assert not cancelled_by(forged, carol.public, "desk:1")
    for junk in (STARTED, b"", None, b"cancel alice !!!", b"cancel alice", mark + b" x"):
        assert not cancelled_by(junk, alice.public, "desk:1")
    assert signer(STARTED) == ""
