"""A scientist's own requests from TypeScript (issue 19's additions to the Python client), in
Node, through the HTTP edge, on real workers: the built client (``clients/ts/dist``) runs
``clients/ts/scripts/requests.mjs`` against two manual-approval nodes of the session's grid —
lists her requests (``grid.requests``) as the Python client lists them, cancels hers
(``grid.cancelRequest``, ``ticket.cancel()``) and not another user's, hears the owner's denial
and an undecided request's expiry (``RequestExpired``) — and the Python client and the node's
owner see what it did. A job waiting in the queue of a node whose worker is down is cancelled
from TypeScript through the edge's ``POST /v1/jobs/{id}/cancel`` (not by another user, nor with
a forged or foreign signature), and the node, back up, does not run it.

No skip: without ``node`` or the build (``make ts``; ``make test`` runs it first) this fails."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.local import LocalGrid
from orchestrator import Grid
from protocol.errors import CannotCancel, JobCancelled, RequestDenied, RequestExpired

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "ts"
SCRIPT = CLIENT / "scripts" / "requests.mjs"
USERS = ("alice", "bob", "carol")
LAPSE_SECONDS = 3.0



@pytest.fixture(scope="module")
def tsdesk(manual_node) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    """A manual node whose requests wait a week (the default)."""
    yield from manual_node("tsdesk")


@pytest.fixture(scope="module")
def tslapse(manual_node) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    """A manual node whose requests expire after a few seconds."""
    yield from manual_node("tslapse", f"expire_after = {LAPSE_SECONDS}")


@pytest.fixture(scope="module")
def tsqueue(manual_node) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    """A node whose worker the test stops and starts again (its jobs wait in its queue meanwhile)."""
    yield from manual_node("tsqueue")


@pytest.fixture(scope="module")
def tsgone(manual_node) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    """A node whose worker the test kills (kill -9) while it still counts as up."""
    yield from manual_node("tsgone")


@pytest.fixture(scope="module")
def edge(local_grid: LocalGrid) -> Iterator[str]:
    """An edge of its own on the session's grid, admitting the scientists' keys."""
    local_grid.ensure_keys(*USERS)
    yield local_grid.start_edge(None, name="edge-ts-requests")
    local_grid.kill("edge-ts-requests")


def steps(lg: LocalGrid, edge: str, user: str, *todo: dict[str, Any], timeout: float = 30) -> list[dict[str, Any]]:
    """What the TS client gives for each of ``todo``, run as ``user`` through ``edge`` (``timeout``:
    the client's, in seconds)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: the TypeScript client's live test needs Node 20 (see clients/ts/README.md)")
    if not (CLIENT / "dist" / "index.js").exists():
        pytest.fail("clients/ts/dist is missing: run `make ts` (npm ci, build and test of the TypeScript client) first")
    args = {"edge": edge, "key": str(lg.keys / f"{user}.key"), "gateway_key": lg.gateway_key(), "timeout": timeout,
            "steps": list(todo)}
    done = subprocess.run([node, str(SCRIPT)], input=json.dumps(args), capture_output=True, text=True, timeout=180,
                          check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    assert out["identity"] == user
    results: list[dict[str, Any]] = out["results"]
    return results


def ok(result: dict[str, Any]) -> dict[str, Any]:
    assert result["ok"], result
    return result


def refused(result: dict[str, Any]) -> tuple[str, str]:
    assert not result["ok"], result
    return result["error"]["code"], result["error"]["message"]


def python_view(grid: Grid, node: str, status: str | None = None) -> list[dict[str, Any]]:
    """The Python client's listing, as JSON (what the TS client prints is the node's signed JSON)."""
    return [r.model_dump(mode="json") for r in grid.requests(node, status)]


def _settled(ticket: Any, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while (status := ticket.status) in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.02)
    return status


def test_alice_lists_and_cancels_hers_from_typescript_and_not_bobs(local_grid: LocalGrid, edge: str,
                                                                   tsdesk: Path) -> None:
    desk = {"tags": ["#tsdesk"], "node": "tsdesk"}
    kept, private, third, fourth, done = (ok(r) for r in steps(
        local_grid, edge, "alice",
        {"op": "submit", **desk, "column": "weight", "reduce": "sum"},  # compute: waits for the owner here
        {"op": "submit", **desk, "column": "height", "reduce": "mean", "epsilon": 0.2},
        {"op": "submit", **desk, "column": "weight", "reduce": "max"},
        {"op": "submit", **desk, "column": "height", "reduce": "sum"},
        {"op": "submit", "tags": ["#birth-records"], "node": "hospital", "column": "weight", "reduce": "sum"}))
    assert {r["status"] for r in (kept, private, third, fourth)} == {"pending_approval"} and done["status"] == "done"
    mine = [r["job_id"] for r in (kept, private, third, fourth)]
    with local_grid.connect("bob") as bob:
        theirs = bob.search("#tsdesk")["tsdesk"][0]["weight"].max().submit()
        assert _settled(theirs) == "pending_approval"
    owner = local_grid.owner(tsdesk)
    try:
        owner.deny(fourth["job_id"], "not this term")
    finally:
        owner.close()

    with local_grid.connect("alice") as alice:
        before = python_view(alice, "tsdesk")
        results = steps(
            local_grid, edge, "alice",
            {"op": "requests", "node": "tsdesk", "status": "pending"},            # 0
            {"op": "requests", "node": "tsdesk"},                                  # 1
            {"op": "requests"},                                                    # 2: every node that is up
            {"op": "cancel_request", "id": theirs.id},                             # 3: bob's
            {"op": "cancel_request", "id": kept["job_id"]},                        # 4
            {"op": "wait", "job_id": kept["job_id"], "timeout": 10},               # 5
            {"op": "status", "job_id": kept["job_id"]},                            # 6
            {"op": "cancel_request", "id": kept["job_id"]},                        # 7: again
            {"op": "cancel_request", "id": "tsdesk:nope"},                         # 8
            {"op": "cancel", "job_id": private["job_id"]},                         # 9: ticket.cancel()
            {"op": "cancel", "job_id": private["job_id"]},                         # 10: again
            {"op": "wait", "job_id": private["job_id"], "timeout": 10},            # 11
            {"op": "cancel_request", "id": third["job_id"][:len("tsdesk:") + 12]},  # 12: a prefix
            {"op": "wait", "job_id": fourth["job_id"], "timeout": 10},             # 13: denied by the owner
            {"op": "cancel", "job_id": fourth["job_id"]},                          # 14
            {"op": "cancel", "job_id": done["job_id"]},                            # 15
            {"op": "requests", "node": "tsdesk"})                                  # 16
        after = python_view(alice, "tsdesk")

        # the listing: hers only, oldest first, exactly what the Python client lists
        assert [r["id"] for r in ok(results[0])["requests"]] == mine[:3]
        assert ok(results[1])["requests"] == before and [r["id"] for r in before] == mine
        assert [r["status"] for r in before] == ["pending", "pending", "pending", "denied"]
        assert before[3]["decision"] == "not this term" and before[3]["decided_at"] is not None
        assert all(r["expires_at"] is not None for r in before[:3]) and before[3]["expires_at"] is None
        assert [r for r in ok(results[2])["requests"] if r["id"].startswith("tsdesk:")] == before
        assert theirs.id not in {r["id"] for r in ok(results[2])["requests"]}

        # cancelling: not bob's; hers, by id, by ticket.cancel() and by a prefix of its id
        code, message = refused(results[3])
        assert code == "permission_denied" and "only the user who sent it may cancel it" in message
        assert (ok(results[4])["request"]["id"], results[4]["request"]["status"]) == (kept["job_id"], "cancelled")
        assert refused(results[5])[0] == "job_cancelled" and "'alice' cancelled this compute request" in results[5][
            "error"]["message"]
        assert ok(results[6])["status"] == "cancelled"
        assert ok(results[7])["request"]["status"] == "cancelled"
        assert refused(results[8])[0] == "invalid_request" and "is not a request id" in results[8]["error"]["message"]
        assert ok(results[9])["status"] == ok(results[10])["status"] == "cancelled"
        assert refused(results[11])[0] == "job_cancelled"
        assert ok(results[12])["request"]["id"] == third["job_id"] and results[12]["request"]["status"] == "cancelled"
        code, message = refused(results[13])
        assert code == "request_denied" and "not this term" in message
        code, message = refused(results[14])
        assert code == "cannot_cancel" and "has already finished at 'tsdesk' (denied)" in message
        code, message = refused(results[15])
        assert code == "cannot_cancel" and "has already finished at 'hospital' (done)" in message
        assert ok(results[16])["requests"] == after
        assert [r["status"] for r in after] == ["cancelled", "cancelled", "cancelled", "denied"]

        # what the Python client and the owner see of it
        for job in mine[:3]:
            ticket = alice.ticket(job)
            assert ticket.status == "cancelled"
            with pytest.raises(JobCancelled):
                ticket.wait(timeout=10)
        with pytest.raises(RequestDenied, match="not this term"):
            alice.ticket(fourth["job_id"]).wait(timeout=10)
    with local_grid.connect("bob") as bob:
        assert [r.id for r in bob.requests("tsdesk", "pending")] == [theirs.id]  # untouched
    owner = local_grid.owner(tsdesk)
    try:
        assert [owner.request(job).status for job in mine] == ["cancelled", "cancelled", "cancelled", "denied"]
        owner.deny(theirs.id, "tidy up")
    finally:
        owner.close()


def test_a_request_left_undecided_expires_and_the_ts_client_is_told(local_grid: LocalGrid, edge: str,
                                                                   tslapse: Path) -> None:
    lapse = {"tags": ["#tslapse"], "node": "tslapse"}
    (sent,) = steps(local_grid, edge, "carol", {"op": "submit", **lapse, "column": "weight", "reduce": "mean",
                                                "epsilon": 0.5})
    assert ok(sent)["status"] == "pending_approval"
    job = sent["job_id"]
    listed, waited, status, after = steps(
        local_grid, edge, "carol",
        {"op": "requests", "node": "tslapse", "status": "pending"},
        {"op": "wait", "job_id": job, "timeout": LAPSE_SECONDS + 15},  # the worker's sweep answers it
        {"op": "status", "job_id": job},
        {"op": "requests", "node": "tslapse"})
    (mine,) = ok(listed)["requests"]
    assert mine["id"] == job and mine["status"] == "pending"
    assert mine["expires_at"] == pytest.approx(mine["created_at"] + LAPSE_SECONDS)
    code, message = refused(waited)
    assert code == "request_expired" and "without a decision" in message and "Send the work again" in message
    assert waited["error"]["name"] == "RequestExpired"
    assert ok(status)["status"] == "denied"  # as Python's ticket says of an expired request
    (expired,) = ok(after)["requests"]
    assert expired["status"] == "expired" and expired["decided_at"] == pytest.approx(mine["expires_at"])
    assert expired["expires_at"] is None
    with local_grid.connect("carol") as carol:
        assert python_view(carol, "tslapse") == [expired]
        with pytest.raises(RequestExpired):
            carol.ticket(job).wait(timeout=10)


def test_a_queued_job_cancelled_from_typescript_never_runs(local_grid: LocalGrid, edge: str, tsqueue: Path) -> None:
    """ticket.cancel() in TypeScript of a job waiting in its node's queue: through the edge's
    POST /v1/jobs/{id}/cancel its signed cancellation is on the job's key before the node takes
    it up; not bob's, nor a forged or another job's signature. The node, back up, answers it
    JobCancelled and runs nothing of it (the Python ticket of the same id says so too); the job
    sent with it, not cancelled, runs. A finished job cannot be cancelled."""
    import redis

    from ops.edge.client import EdgeClient
    from ops.keys import read_identity
    from protocol.cancel import cancellation
    from protocol.contract import alive_key, node_queue
    from protocol.identity import Identity
    from workers.storage.store import Store

    home = local_grid.home
    queue = {"tags": ["#tsqueue"], "node": "tsqueue", "column": "weight", "reduce": "mean", "raw": True}
    alive = alive_key(node_queue("tsqueue"))
    admin = redis.Redis.from_url(local_grid.url)
    local_grid.kill("tsqueue")  # its worker is down (kill -9) and its last word that it is up still stands:
    admin.setex(alive, 120, "held")  # the edge takes jobs for it (for as long as the test needs), which wait
    try:
        held, other, done = (ok(r) for r in steps(
            local_grid, edge, "alice", {"op": "send", **queue}, {"op": "send", **queue},
            {"op": "submit", "tags": ["#birth-records"], "node": "hospital", "column": "weight", "reduce": "sum"}))
        assert (held["status"], other["status"], done["status"]) == ("queued", "queued", "done")
        job = held["job_id"]

        # bob (through the TS client), then forged, foreign and unknown signatures (over HTTP): refused
        bobs, status = steps(local_grid, edge, "bob", {"op": "cancel", "job_id": job}, {"op": "status", "job_id": job})
        code, message = refused(bobs)
        assert code == "permission_denied" and "is another user's; only the user who sent a job" in message
        assert "alice" not in message
        assert ok(status)["status"] == "queued"
        alice, bob = (read_identity(local_grid.keys / f"{u}.key") for u in ("alice", "bob"))
        path = f"/v1/jobs/{job}/cancel"
        with EdgeClient(edge) as http:
            for code, mark in (("bad_signature", cancellation(bob, job).replace(b"cancel bob ", b"cancel alice ")),
                               ("bad_signature", cancellation(alice, other["job_id"])),  # another job's
                               ("unknown_sender", cancellation(Identity.generate("nobody-the-edge-knows"), job)),
                               ("invalid_request", b"started")):
                got, answer = http.call("POST", path, {"cancellation": mark.decode()})
                assert (got, answer["error"]["code"]) == (400 if code == "invalid_request" else 401, code), answer
            never = f"tsqueue:{'0' * 32}"
            assert http.call("POST", f"/v1/jobs/{never}/cancel", {"cancellation": cancellation(alice, never).decode()}
                             )[0] == 404
            assert http.call("GET", f"/v1/jobs/{job}")[1] == {"state": "PENDING", "reply": None, "cancel_mark": None}

        # alice cancels it from TypeScript: at once, while its node is down
        started = time.monotonic()
        first, again, said, waited, late = steps(
            local_grid, edge, "alice",
            {"op": "cancel", "job_id": job}, {"op": "cancel", "job_id": job}, {"op": "status", "job_id": job},
            {"op": "wait", "job_id": job, "timeout": 20},  # the node is down: only the mark can say it (at once)
            {"op": "cancel", "job_id": done["job_id"]})
        assert time.monotonic() - started < 15  # wait() did not sit out its 20 s: the edge's long-poll showed the mark
        assert ok(first)["status"] == ok(again)["status"] == ok(said)["status"] == "cancelled"
        code, message = refused(waited)
        assert code == "job_cancelled" and f"you cancelled job {job} before 'tsqueue' ran it" in message
        code, message = refused(late)
        assert code == "cannot_cancel" and "has already finished at 'hospital' (done)" in message
        mine = cancellation(alice, job).decode()
        with EdgeClient(edge) as http:
            assert http.call("GET", f"/v1/jobs/{job}")[1]["cancel_mark"] == mine
            assert http.call("POST", path, {"cancellation": mine}) == (200, {"job_id": job, "cancelled": False,
                                                                             "mark": mine})  # hers, already there
            finished = done["job_id"]
            assert http.call("POST", f"/v1/jobs/{finished}/cancel", {"cancellation": cancellation(
                alice, finished).decode()}) == (200, {"job_id": finished, "cancelled": False, "mark": "started"})
        with local_grid.connect("alice") as grid:
            assert grid.ticket(job).status == "cancelled"  # the Python client reads the same mark
            with pytest.raises(CannotCancel, match=r"has already finished at 'hospital' \(done\)"):
                grid.ticket(done["job_id"]).cancel()

        # the node comes back: it takes the job up, finds her cancellation, and runs nothing of it
        local_grid.start_node(tsqueue, "tsqueue")
        local_grid.wait_ready(["tsqueue"])
        with local_grid.connect("alice") as grid:
            with pytest.raises(JobCancelled, match="alice cancelled this job before 'tsqueue' started it: it did not "
                                                   "run"):
                grid.ticket(job).wait(timeout=60)
            expected = grid.search("#tsqueue")["tsqueue"][0]["weight"].mean().get()
            assert grid.ticket(other["job_id"]).value(timeout=60).item() == expected.item()  # not cancelled: it ran
        waited, said, again, ran = steps(local_grid, edge, "alice", {"op": "wait", "job_id": job, "timeout": 20},
                                         {"op": "status", "job_id": job}, {"op": "cancel", "job_id": job},
                                         {"op": "wait", "job_id": other["job_id"], "timeout": 20})
        code, message = refused(waited)
        assert code == "job_cancelled" and "alice cancelled this job before 'tsqueue' started it" in message
        assert ok(said)["status"] == ok(again)["status"] == "cancelled" and ok(ran)["status"] == "done"
        store = Store(home / "tsqueue", f"sqlite:///{home / 'tsqueue' / 'node.db'}")
        try:
            answered = store.job(job)
            assert answered is not None and answered.status == "failed" and answered.attempts == 1
            assert store.count_objects(job) == 0  # nothing of it ran, nothing is kept
        finally:
            store.close()
    finally:
        if "tsqueue" not in local_grid.procs:
            admin.delete(alive)
        admin.close()


def test_a_node_killed_moments_ago_is_named_in_missing_not_waited_for(local_grid: LocalGrid, edge: str, tsdesk: Path,
                                                                     tsgone: Path) -> None:
    """grid.requests() of every node, in TypeScript, while one node's worker has just been killed
    (kill -9) and its last word that it is up still stands (the edge takes its job): the other
    node's requests within seconds, the silent node named in ``missing`` — not the client's
    timeout and a NodeUnavailable for the lot. Asked of that node alone: NodeUnavailable."""
    import redis

    from protocol.contract import alive_key, node_queue

    alive = alive_key(node_queue("tsgone"))
    with local_grid.connect("carol") as carol, redis.Redis.from_url(local_grid.url) as admin:
        here = carol.search("#tsdesk")["tsdesk"][0]["height"].max().submit()  # compute: waits for the owner
        there = carol.search("#tsgone")["tsgone"][0]["height"].max().submit()
        assert {_settled(t) for t in (here, there)} == {"pending_approval"}
        local_grid.kill("tsgone")
        try:
            assert admin.exists(alive)  # it still counts as up
            started = time.monotonic()
            (listed,) = steps(local_grid, edge, "carol", {"op": "requests"})
            assert time.monotonic() - started < 20  # Node's start and a 5 s wait, not the client's 30 s
            ids = [r["id"] for r in ok(listed)["requests"]]
            assert here.id in ids and not any(i.startswith("tsgone:") for i in ids)
            assert list(listed["missing"]) == ["tsgone"]
            assert listed["missing"]["tsgone"].startswith("no answer within 5 s: its worker may have stopped in the "
                                                          "last 20 s")
            assert [r.id for r in carol.requests() if r.id in ids] == ids  # the Python client lists the same
            admin.setex(alive, 60, "held")  # its last word stands for the rest of the test, as just after the crash
            alone, heard = steps(local_grid, edge, "carol", {"op": "requests", "node": "tsgone"},
                                 {"op": "requests", "node": "tsdesk"}, timeout=3)
            code, message = refused(alone)
            assert code == "node_unavailable" and "on 'tsgone' is queued after 3 s" in message
            assert [r["id"] for r in ok(heard)["requests"]] == [here.id] and heard["missing"] == {}
        finally:
            admin.delete(alive)  # down now, as it would be 20 s on: later listings skip it at once
        carol.cancel_request(here.id)  # tidy up
