"""Issue 19, the owner's tools and the scientist's own requests, on real workers:
`gridq datasets` publishes, lists, shows and unpublishes (scientists find and lose the data
at once; every mistake is a typed error); requests left undecided expire (the scientist's
ticket raises RequestExpired, the owner sees them expired and cannot approve them); a
scientist lists and cancels her own requests and no one else's; `gridq audit export` writes
a real run's releases and decisions as CSV and JSON Lines."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from ops.cli import app
from ops.local import LocalGrid
from orchestrator import Expression, Grid, JobTicket
from protocol.errors import ApprovalRequired, InvalidRequest, JobCancelled, PermissionDenied, RequestExpired
from protocol.messages import RawRelease, RunJob
from workers.audit import COLUMNS

LAPSE_SECONDS = 3.0


@pytest.fixture(scope="module")
def desk(manual_node) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    """A manual node whose requests wait a week (the default)."""
    yield from manual_node("desk")


@pytest.fixture(scope="module")
def lapse(manual_node) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    """A manual node whose requests expire after a few seconds."""
    yield from manual_node("lapse", f"expire_after = {LAPSE_SECONDS}")


def gridq(local_grid: LocalGrid, *args: str, ok: bool = True) -> str:
    env = {"GRIDQ_HOME": str(local_grid.home), "GRIDQ_BROKER": local_grid.url, "COLUMNS": "250"}
    result = CliRunner().invoke(app, list(args), env=env)
    assert (result.exit_code == 0) == ok, result.output + repr(result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.output


def _settled(ticket: Any, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while (status := ticket.status) in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.02)
    return status


def _until(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.1)


def exactly(grid: Grid, expr: Expression) -> JobTicket:
    """``expr.get()``'s job (the exact value asked for), as a ticket."""
    return grid.submit(expr.node, RunJob(plan=expr.plan, release=RawRelease()))


def _table_rows(output: str) -> list[dict[str, str]]:
    """A table as `gridq` prints it piped: one line a row, every value whole."""
    header, *rows = [[cell.strip() for cell in line.rstrip()[1:-1].split(line[0])]
                     for line in output.splitlines() if line.startswith(("│", "┃"))]
    return [dict(zip(header, row, strict=True)) for row in rows]


# --- 1. gridq datasets ---------------------------------------------------------------------------

def test_the_owner_publishes_lists_shows_and_unpublishes_from_the_shell(local_grid: LocalGrid, desk: Path,
                                                                        tmp_path: Path) -> None:
    data = tmp_path / "visits.csv"
    data.write_text("weight,height\n3.5,50\n4.25,52.5\n2.0,48\n")
    description = "Visits of the spring term, one row per visit: weight (kg) and height (cm) " * 3
    out = gridq(local_grid, "datasets", "publish", str(desk), "desk-visits", str(data), "-d", description,
                "-t", "#visits", "-t", "#spring", "-a", "alice", "-b", "weight=0:7", "-b", "height=20:65")
    assert "published desk-visits on desk: 3 x 2 float64, columns weight, height" in out
    with local_grid.connect("alice") as alice:  # the gateway heard of it: scientists find it
        _until(lambda: "desk-visits" in [p.name for p in alice.search("#visits").get("desk", [])])
        visits = alice.search("#visits")["desk"][0]
        assert torch.equal(visits["weight"].sum().get(), torch.tensor(9.75, dtype=torch.float64))

    listed = {row["name"]: row for row in _table_rows(gridq(local_grid, "datasets", "list", str(desk)))}  # piped
    assert set(listed) == {"desk-births", "desk-visits"}
    row = listed["desk-visits"]
    assert row["description"] == description.strip()  # whole, however long (a cell's edges are padding)
    assert (row["rows"], row["dtype"], row["tags"], row["allowed users"], row["in config"]) == (
        "3", "float64", "#visits, #spring", "alice", "no")
    assert listed["desk-births"]["in config"] == "yes"
    as_json = gridq(local_grid, "datasets", "list", str(desk), "--json").splitlines()
    assert [json.loads(line)["name"] for line in as_json] == ["desk-births", "desk-visits"]
    assert json.loads(as_json[1])["description"] == description  # exactly, trailing space and all

    shown = json.loads(gridq(local_grid, "datasets", "show", str(desk), "desk-visits", "--json"))
    assert shown["bounds"] == {"weight": [0.0, 7.0], "height": [20.0, 65.0]}
    assert shown["mock"] == "drawn within the bounds"
    assert [p["rows"] for p in shown["publications"]] == [3]
    text = gridq(local_grid, "datasets", "show", str(desk), "desk-visits")
    assert "allowed users  alice" in text and "#visits, #spring" in text

    out = gridq(local_grid, "datasets", "unpublish", str(desk), "desk-visits")
    assert "unpublished desk-visits from desk" in out
    with local_grid.connect("alice") as alice:
        _until(lambda: "desk" not in alice.search("#visits"))
    assert "desk-visits" not in gridq(local_grid, "datasets", "list", str(desk))


@pytest.fixture(scope="module")
def desk_by_name(local_grid: LocalGrid, desk: Path) -> Iterator[str]:
    """The desk node by its name, as `gridq up`'s nodes are named ($GRIDQ_HOME/nodes/desk.toml)."""
    named = local_grid.home / "nodes" / "desk.toml"
    named.write_text(desk.read_text())
    yield "desk"
    named.unlink()


@pytest.mark.parametrize("args, error", [
    (["show", "{node}", "nope"], "NotFound: node 'desk' publishes no dataset 'nope'; it publishes desk-births"),
    (["unpublish", "{node}", "nope"], "NotFound: node 'desk' publishes no dataset 'nope'"),
    (["publish", "{node}", "x", "{tmp}/missing.csv"], "InvalidRequest: {tmp}/missing.csv does not exist"),
    (["publish", "{node}", "x", "{tmp}"], "is a folder"),
    (["publish", "{node}", "x", "{tmp}/words.csv"], "not a number"),
    (["publish", "{node}", "x", "{tmp}/latin1.csv"], "cannot be read as a dataset (UnicodeDecodeError"),
    (["publish", "{node}", "x", "{tmp}/table.xlsx"], "unsupported dataset format '.xlsx'"),
    (["publish", "{node}", "x", "{tmp}/broken.safetensors"], "cannot be read as a dataset"),
    (["publish", "{node}", "desk-births", "{tmp}/good.csv"], "already published on 'desk'; --replace"),
    (["publish", "{node}", "x", "{tmp}/good.csv", "-a", "mallory"], "NotFound: allowed_users of 'x': 'mallory' is "
                                                                   "not a user of node 'desk'"),
    (["publish", "{node}", "x", "{tmp}/good.csv", "-b", "weight=0-7"], "write COLUMN=LO:HI"),
    (["publish", "{node}", "x", "{tmp}/good.csv", "-b", "weight=0:1", "-b", "height=0:100"], "outside"),
    (["publish", "{node}", "x", "{tmp}/good.csv", "-b", "weight=0:7"], "must name every column"),
    (["publish", "{node}", "x y", "{tmp}/good.csv"], "InvalidRequest: DatasetMeta: name"),
    (["publish", "{node}", "x", "{tmp}/good.csv", "-t", "no-hash"], "tags start with '#'"),
])
def test_every_mistake_is_a_typed_error_that_says_what_to_do(local_grid: LocalGrid, desk_by_name: str,
                                                             tmp_path: Path, args: list[str], error: str) -> None:
    (tmp_path / "good.csv").write_text("weight,height\n3.5,50\n")
    (tmp_path / "words.csv").write_text("weight,height\nheavy,tall\n")
    (tmp_path / "latin1.csv").write_bytes(b"poids,taille\n3,5\n" + "é".encode("latin-1") + b",1\n")
    (tmp_path / "table.xlsx").write_bytes(b"PK\x03\x04")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    filled = [a.format(node=desk_by_name, tmp=tmp_path) for a in args]
    out = " ".join(gridq(local_grid, "datasets", *filled, ok=False).split())
    assert "error: " in out and error.format(tmp=tmp_path) in out, out


# --- 2. requests expire ------------------------------------------------------------------------

def test_a_request_left_undecided_expires_and_the_scientist_is_told(local_grid: LocalGrid, lapse: Path) -> None:
    with local_grid.connect("carol") as carol:
        births = carol.search("#lapse")["lapse"][0]
        ticket = births["weight"].mean().submit(epsilon=0.5)
        assert _settled(ticket) == "pending_approval"
        (mine,) = carol.requests("lapse", "pending")
        assert mine.id == ticket.id and mine.expires_at == pytest.approx(mine.created_at + LAPSE_SECONDS)
        with pytest.raises(RequestExpired, match="without a decision .* Send the work again"):
            ticket.wait(timeout=LAPSE_SECONDS + 15)  # the worker's sweep answers it, with no one looking
        assert ticket.status == "denied"
        (expired,) = carol.requests("lapse")
        assert expired.status == "expired" and expired.decided_at == pytest.approx(mine.expires_at)
    listing = gridq(local_grid, "requests", "list", str(lapse), "--all")
    assert ticket.id in listing and "expired" in listing
    assert ticket.id not in gridq(local_grid, "requests", "list", str(lapse))  # off the pending queue
    refused = gridq(local_grid, "requests", "approve", str(lapse), ticket.id, ok=False)
    assert "InvalidRequest" in refused and "expired" in refused and "send the work again" in refused


def test_approving_just_past_the_deadline_is_refused_through_the_owner_api(local_grid: LocalGrid,
                                                                           lapse: Path) -> None:
    """The owner's approve comes after the deadline but before the worker's sweep: the request
    is closed as expired then and there, and the scientist is told at once."""
    node = local_grid.owner(lapse)
    try:
        with local_grid.connect("bob") as bob:
            ticket = bob.search("#lapse")["lapse"][0]["height"].max().submit()
            assert _settled(ticket) == "pending_approval"
            due = node.request(ticket.id).created_at + LAPSE_SECONDS
            time.sleep(max(0.0, due - time.time()) + 0.01)  # due now: the worker's sweep may or may not have come
            with pytest.raises(InvalidRequest, match="expired at .* may send the work again"):
                node.approve(ticket.id)
            with pytest.raises(RequestExpired):
                ticket.wait(timeout=10)
            assert node.request(ticket.id).status == "expired"
    finally:
        node.close()


# --- 4. the scientist's own requests ---------------------------------------------------------

def test_alice_lists_and_cancels_hers_and_not_bobs(local_grid: LocalGrid, desk: Path) -> None:
    with local_grid.connect("alice") as alice, local_grid.connect("bob") as bob:
        births = alice.search("#desk")["desk"][0]
        kept = births["weight"].sum().submit()  # compute waits for the owner here
        private = births["height"].mean().submit(epsilon=0.2)
        theirs = bob.search("#desk")["desk"][0]["weight"].max().submit()
        assert {_settled(t) for t in (kept, private, theirs)} == {"pending_approval"}

        mine = alice.requests("desk", "pending")
        assert [r.id for r in mine] == [kept.id, private.id]  # hers only, oldest first
        assert {r.kind for r in mine} == {"compute", "dp"} and all(r.datasets == ["desk-births"] for r in mine)
        assert [r.id for r in alice.requests() if r.status == "pending" and r.id.startswith("desk:")] == \
            [kept.id, private.id]  # every node that is up: the same
        assert bob.requests("desk", "pending")[0].id == theirs.id

        with pytest.raises(PermissionDenied, match="only the user who sent it may cancel it"):
            alice.cancel_request(theirs.id)
        cancelled = alice.cancel_request(kept.id)
        assert (cancelled.id, cancelled.status) == (kept.id, "cancelled")
        with pytest.raises(JobCancelled, match="alice' cancelled this compute request"):
            kept.wait(timeout=10)  # her ticket hears at once
        assert alice.cancel_request(kept.id).status == "cancelled"  # again: no error
        with pytest.raises(InvalidRequest, match="is not a request id"):
            alice.cancel_request("desk:nope")

        pending = gridq(local_grid, "requests", "list", str(desk))
        assert kept.id not in pending and private.id in pending and theirs.id in pending  # bob's untouched
        assert "cancelled" in gridq(local_grid, "requests", "list", str(desk), "--all")
        refused = gridq(local_grid, "requests", "approve", str(desk), kept.id, ok=False)
        assert "cancelled by its requester, 'alice'" in refused

        # the same from the shell, as alice
        rows = _table_rows(gridq(local_grid, "my-requests", "list", "-i", "alice", "--node", "desk"))
        assert {r["id"]: r["status"] for r in rows}[kept.id] == "cancelled" and theirs.id not in {r["id"] for r in rows}
        as_json = [json.loads(line) for line in gridq(local_grid, "my-requests", "list", "-i", "alice", "--node",
                                                       "desk", "--json").splitlines()]
        assert {r["id"]: r["status"] for r in as_json}[kept.id] == "cancelled"
        out = gridq(local_grid, "my-requests", "cancel", theirs.id, "-i", "alice", ok=False)
        assert "PermissionDenied" in out
        assert "cancelled" in gridq(local_grid, "my-requests", "cancel", private.id, "-i", "alice")
        with pytest.raises(JobCancelled):
            private.wait(timeout=10)
        gridq(local_grid, "requests", "deny", str(desk), theirs.id, "--reason", "not this term")  # tidy up


# --- 3. the audit -------------------------------------------------------------------------------

def test_a_real_runs_releases_and_decisions_export_as_csv_and_jsonl(local_grid: LocalGrid, desk: Path,
                                                                    tmp_path: Path, births_feb: torch.Tensor) -> None:
    with local_grid.connect("alice") as alice, local_grid.connect("carol") as carol:
        mine = alice.search("#desk")["desk"][0]
        raw = exactly(alice, mine["weight"].mean())  # her own data: the raw door, at once
        assert torch.equal(raw.value(timeout=30), births_feb[:, 0].mean())
        births = carol.search("#desk")["desk"][0]
        dp = births["weight"].mean().submit(epsilon=0.5)
        exact = exactly(carol, births["height"].max())  # not hers: the approved door, if the owner approves
        refused = exactly(carol, births["weight"].max())
        assert {_settled(t) for t in (dp, exact, refused)} == {"pending_approval"}
        with pytest.raises(ApprovalRequired):
            exact.wait(timeout=1)
        gridq(local_grid, "requests", "approve", str(desk), dp.id)
        gridq(local_grid, "requests", "approve", str(desk), exact.id)
        gridq(local_grid, "requests", "deny", str(desk), refused.id, "--reason", 'no, "not" this; see ticket 12')
        assert dp.private_value(timeout=30).noise.epsilon == pytest.approx(0.5)
        assert torch.equal(exact.value(timeout=30), births_feb[:, 1].max())

    out = tmp_path / "audit.csv"
    gridq(local_grid, "audit", "export", str(desk), "--format", "csv", "-o", str(out))
    assert out.stat().st_mode & 0o777 == 0o600
    text = out.read_text()
    assert text.splitlines()[0] == ",".join(COLUMNS)
    from_csv = list(csv.DictReader(io.StringIO(text)))
    from_jsonl = [json.loads(line) for line in gridq(local_grid, "audit", "export", str(desk), "-f", "jsonl")
                  .splitlines()]
    assert len(from_csv) == len(from_jsonl) and [r["request_id"] for r in from_csv] == \
        [r["request_id"] for r in from_jsonl]
    assert all(list(r) == list(COLUMNS) for r in from_jsonl)
    times = [datetime.fromisoformat(r["time"]) for r in from_jsonl]
    assert all(t.tzinfo == UTC for t in times) and times == sorted(times)

    def rows(job_id: str) -> dict[str, dict[str, Any]]:
        return {r["event"]: r for r in from_jsonl if r["request_id"] == job_id}

    assert rows(raw.id)["release"] | {"time": None} == {
        "time": None, "event": "release", "node": "desk", "request_id": raw.id, "user": "alice",
        "datasets": ["desk-births"], "door": "raw", "kind": None, "what": "value", "mechanism": None,
        "epsilon": None, "delta": None, "status": "released", "decided_by": None, "reason": None,
        "request_reason": None, "requested_at": None}
    decided, released = rows(dp.id)["decision"], rows(dp.id)["release"]
    assert (decided["status"], decided["decided_by"], decided["door"], decided["epsilon"]) == (
        "approved", "owner", "dp", 0.5)
    assert (released["door"], released["mechanism"], released["epsilon"], released["user"]) == (
        "dp", "laplace", 0.5, "carol")
    assert released["time"] >= decided["time"]
    assert (rows(exact.id)["release"]["door"], rows(exact.id)["decision"]["kind"]) == ("approved", "raw")
    denial = rows(refused.id)
    assert set(denial) == {"decision"} and denial["decision"]["status"] == "denied"
    assert denial["decision"]["reason"] == 'no, "not" this; see ticket 12'
    csv_denial = next(r for r in from_csv if r["request_id"] == refused.id)
    assert csv_denial["reason"] == 'no, "not" this; see ticket 12' and csv_denial["datasets"] == "desk-births"
    cancelled = [r for r in from_jsonl if r["status"] == "cancelled"]  # from the test above, if it ran first
    assert all(r["decided_by"] == "alice" and r["event"] == "decision" for r in cancelled)
