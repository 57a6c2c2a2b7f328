"""The audit trail (``workers.audit``, ``gridq audit export``) over a real node store and the
node's JobRunner in this process: every release (raw, approved, DP) and every decision is one
row, in a stable column order, with ISO-8601 UTC times; CSV and JSON Lines parse back to the
same rows; kept results, budgets and mock twins are no releases."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch

from protocol.contract import Tasks
from protocol.envelope import seal_envelope
from protocol.errors import InvalidRequest
from protocol.identity import Identity
from protocol.messages import BudgetQuery, DatasetMeta, DPRelease, KeepRelease, MockRequest, RawRelease, RunJob
from protocol.plan import InputRef, Plan, Ref, Step
from protocol.serving import Answer
from workers import audit
from workers.config import ApprovalSection, BudgetSection
from workers.jobs.context import NodeContext
from workers.jobs.runner import JobRunner
from workers.policy.approvals import Requests, refusal
from workers.policy.ledger import Ledger
from workers.storage.store import Store

NODE = Identity.generate("ward")
ALICE, BOB = Identity.generate("alice"), Identity.generate("bob")
DATA = torch.arange(12, dtype=torch.float64).reshape(6, 2)


def mean(dataset: str = "births", ref: str = "dataset") -> Plan:
    return Plan(inputs=[InputRef(kind=ref, name=dataset)], steps=[Step(op="mean", args=[Ref(ref=0)], params={})])


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[JobRunner, Store, dict[str, Any]]]:
    """A manual node (alice's own data auto) with two datasets alice may see raw."""
    store = Store(tmp_path / "store", f"sqlite:///{tmp_path / 'node.db'}")
    for name in ("births", "deaths"):
        store.put_dataset(DatasetMeta(node="ward", name=name, shape=(6, 2), dtype="float64", bounds=[(0.0, 11.0)]),
                          DATA, ["alice"], None)
    delivered: dict[str, Any] = {}
    context = NodeContext("ward", NODE, {"alice": ALICE.public, "bob": BOB.public}, store,
                          Ledger(store, "ward", BudgetSection(default_epsilon=5.0)),
                          ApprovalSection(default="manual", auto=["raw_if_allowed", "dp"]), lambda data: "k",
                          lambda key: b"", lambda name: pytest.fail(f"no other node's key is needed, asked {name}"))
    yield JobRunner(context, deliver=delivered.__setitem__), store, delivered
    store.close()


def send(runner: JobRunner, body: Any, sender: Identity, job_id: str) -> Answer:
    env = seal_envelope(sender, recipient="ward", kind=body.kind, job_id=job_id, body=body.model_dump(mode="json"),
                        now=time.time())
    return runner.answer(Tasks.RUN_JOB, env.model_dump(mode="json"), job_id)


def a_run(runner: JobRunner, store: Store) -> None:
    """Jobs of every kind: raw, DP, kept, budget, mock; parked ones approved and denied."""
    send(runner, RunJob(plan=mean(), release=RawRelease()), ALICE, "ward:raw-alice")  # raw door
    send(runner, RunJob(plan=mean("deaths"), release=DPRelease(epsilon=0.5)), BOB, "ward:dp-bob")  # dp door
    send(runner, RunJob(plan=mean(), release=KeepRelease()), ALICE, "ward:kept")  # parked (compute is manual)
    send(runner, RunJob(plan=mean(), release=RawRelease()), BOB, "ward:raw-bob")  # parked: not bob's data
    send(runner, RunJob(plan=mean("deaths"), release=RawRelease()), BOB, "ward:denied-bob")  # parked
    send(runner, BudgetQuery(), BOB, "ward:budget")  # nothing private leaves
    send(runner, MockRequest(dataset="births"), BOB, "ward:mock")  # a synthetic twin
    requests = Requests(store)
    for job_id in ("ward:kept", "ward:raw-bob"):
        requests.decide(job_id, "approved")
        runner.run_approved(job_id)
    denied = requests.decide("ward:denied-bob", "denied", "not for this study; see ticket 7")
    runner.refuse("ward:denied-bob", refusal(denied, "ward"))


def test_every_release_and_decision_is_one_row_oldest_first(node: tuple[JobRunner, Store, Any]) -> None:
    runner, store, _ = node
    a_run(runner, store)
    rows = audit.rows(store, "ward")
    assert [(r["event"], r["request_id"]) for r in rows] == [
        ("release", "ward:raw-alice"), ("release", "ward:dp-bob"), ("decision", "ward:kept"),
        ("decision", "ward:raw-bob"), ("release", "ward:raw-bob"), ("decision", "ward:denied-bob")]
    by = {(r["event"], r["request_id"]): r for r in rows}
    assert by["release", "ward:raw-alice"] | {"time": None} == {
        "time": None, "event": "release", "node": "ward", "request_id": "ward:raw-alice", "user": "alice",
        "datasets": ["births"], "door": "raw", "kind": None, "what": "value", "mechanism": None, "epsilon": None,
        "delta": None, "status": "released", "decided_by": None, "reason": None, "request_reason": None,
        "requested_at": None}
    dp = by["release", "ward:dp-bob"]
    assert (dp["door"], dp["mechanism"], dp["epsilon"], dp["delta"], dp["datasets"]) == (
        "dp", "laplace", 0.5, 0.0, ["deaths"])
    approved = by["release", "ward:raw-bob"]
    assert (approved["door"], approved["kind"], approved["user"]) == ("approved", "raw", "bob")
    assert approved["requested_at"] is not None
    kept = by["decision", "ward:kept"]  # approved, run, kept at the node: a decision, no release
    assert (kept["status"], kept["door"], kept["kind"], kept["decided_by"]) == ("approved", "keep", "compute", "owner")
    denied = by["decision", "ward:denied-bob"]
    assert (denied["status"], denied["door"], denied["reason"]) == ("denied", "approved",
                                                                    "not for this study; see ticket 7")
    for row in rows:
        assert list(row) == list(audit.COLUMNS)
        assert row["time"].endswith("Z") and datetime.fromisoformat(row["time"]).tzinfo == UTC
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)


def test_csv_and_jsonl_parse_back_to_the_same_rows(node: tuple[JobRunner, Store, Any]) -> None:
    runner, store, _ = node
    a_run(runner, store)
    rows = audit.rows(store, "ward")
    as_csv, as_jsonl = io.StringIO(), io.StringIO()
    assert audit.write(rows, as_csv, "csv") == audit.write(rows, as_jsonl, "jsonl") == len(rows) == 6
    lines = as_csv.getvalue().splitlines()
    assert lines[0] == ",".join(audit.COLUMNS)  # the header, in the stable order
    parsed_csv = list(csv.DictReader(io.StringIO(as_csv.getvalue())))
    parsed_jsonl = [json.loads(line) for line in as_jsonl.getvalue().splitlines()]
    assert [list(r) for r in parsed_jsonl] == [list(audit.COLUMNS)] * len(rows)
    assert parsed_jsonl == rows
    for from_csv, row in zip(parsed_csv, rows, strict=True):
        for column in audit.COLUMNS:
            value = row[column]
            expected = "" if value is None else ";".join(value) if isinstance(value, list) else str(value)
            assert from_csv[column] == expected, column
        if row["epsilon"] is not None:
            assert float(from_csv["epsilon"]) == row["epsilon"]


def test_a_reason_with_commas_quotes_and_newlines_survives_csv(node: tuple[JobRunner, Store, Any]) -> None:
    runner, store, _ = node
    send(runner, RunJob(plan=mean(), release=RawRelease()), BOB, "ward:tricky")
    reason = 'no, "never"\nsecond line; ünïcode'
    Requests(store).decide("ward:tricky", "denied", reason)
    out = io.StringIO()
    audit.write(audit.rows(store, "ward"), out, "csv")
    (row,) = csv.DictReader(io.StringIO(out.getvalue()))
    assert row["reason"] == reason and row["status"] == "denied"


def test_a_value_from_a_kept_result_names_the_datasets_it_came_from(node: tuple[JobRunner, Store, Any]) -> None:
    runner, store, _ = node
    runner.node.approval.default = "auto"  # alice's computation runs at once, and is kept
    send(runner, RunJob(plan=mean("deaths")), ALICE, "ward:keep")
    (object_id,) = kept_objects(store)
    send(runner, RunJob(plan=mean(object_id, "object"), release=RawRelease()), ALICE, "ward:from-kept")
    (row,) = audit.rows(store, "ward")  # keeping it released nothing; getting it did
    assert (row["request_id"], row["datasets"], row["door"], row["what"]) == ("ward:from-kept", ["deaths"], "raw",
                                                                              "value")


def kept_objects(store: Store) -> list[str]:
    from sqlalchemy import select

    from workers.storage.tables import ObjectRow

    with store.session() as s:
        return list(s.scalars(select(ObjectRow.id)))


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="csv or jsonl"):
        audit.write([], io.StringIO(), "xml")


def test_an_empty_node_exports_a_header_only(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", f"sqlite:///{tmp_path / 'n.db'}")
    try:
        out = io.StringIO()
        assert audit.write(audit.rows(store, "ward"), out, "csv") == 0
        assert out.getvalue() == ",".join(audit.COLUMNS) + "\n"
    finally:
        store.close()
