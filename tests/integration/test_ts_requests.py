"""A scientist's own requests from TypeScript (issue 19's additions to the Python client), in
Node, through the HTTP edge, on real workers: the built client (``clients/ts/dist``) runs
``clients/ts/scripts/requests.mjs`` against two manual-approval nodes of the session's grid —
lists her requests (``grid.requests``) as the Python client lists them, cancels hers
(``grid.cancelRequest``, ``ticket.cancel()``) and not another user's, hears the owner's denial
and an undecided request's expiry (``RequestExpired``) — and the Python client and the node's
owner see what it did.

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
from protocol.errors import JobCancelled, RequestDenied, RequestExpired

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "ts"
SCRIPT = CLIENT / "scripts" / "requests.mjs"
USERS = ("alice", "bob", "carol")
LAPSE_SECONDS = 3.0

NODE_CONFIG = """
[node]
id = "{name}"
broker = "${{GRIDQ_BROKER}}"
store = "${{GRIDQ_HOME}}/{name}"
identity = "${{GRIDQ_HOME}}/keys/{name}.key"

[users.alice]
public_key_file = "${{GRIDQ_HOME}}/keys/alice.pub"
[users.bob]
public_key_file = "${{GRIDQ_HOME}}/keys/bob.pub"
[users.carol]
public_key_file = "${{GRIDQ_HOME}}/keys/carol.pub"

[approval]
default = "manual"            # every job waits for the owner …
auto = ["raw_if_allowed"]     # … except allowed users' own data
{expiry}

[[datasets]]
name = "{name}-births"
path = "${{GRIDQ_HOME}}/data/hospital_births_feb.csv"
tags = ["#{name}"]
allowed_users = ["alice"]
bounds = {{ weight = [0.0, 7.0], height = [20.0, 65.0] }}
"""


def _node(local_grid: LocalGrid, name: str, expiry: str = "") -> Iterator[Path]:
    local_grid.ensure_keys(*USERS)  # the node reads its users' keys when it starts
    config = local_grid.home / f"{name}.toml"
    config.write_text(NODE_CONFIG.format(name=name, expiry=expiry))
    local_grid.start_node(config, name)
    local_grid.wait_ready([name])
    yield config
    if name in local_grid.procs:
        local_grid.kill(name)


@pytest.fixture(scope="module")
def tsdesk(local_grid: LocalGrid) -> Iterator[Path]:
    """A manual node whose requests wait a week (the default)."""
    yield from _node(local_grid, "tsdesk")


@pytest.fixture(scope="module")
def tslapse(local_grid: LocalGrid) -> Iterator[Path]:
    """A manual node whose requests expire after a few seconds."""
    yield from _node(local_grid, "tslapse", f"expire_after = {LAPSE_SECONDS}")


@pytest.fixture(scope="module")
def edge(local_grid: LocalGrid) -> Iterator[str]:
    """An edge of its own on the session's grid, admitting the scientists' keys."""
    local_grid.ensure_keys(*USERS)
    yield local_grid.start_edge(None, name="edge-ts-requests")
    local_grid.kill("edge-ts-requests")


def steps(lg: LocalGrid, edge: str, user: str, *todo: dict[str, Any]) -> list[dict[str, Any]]:
    """What the TS client gives for each of ``todo``, run as ``user`` through ``edge``."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: the TypeScript client's live test needs Node 20 (see clients/ts/README.md)")
    if not (CLIENT / "dist" / "index.js").exists():
        pytest.fail("clients/ts/dist is missing: run `make ts` (npm ci, build and test of the TypeScript client) first")
    args = {"edge": edge, "key": str(lg.keys / f"{user}.key"), "gateway_key": lg.gateway_key(), "timeout": 30,
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
