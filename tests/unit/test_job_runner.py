"""The node's JobRunner in this process, on a real store (SQLite in a temporary folder) and
no broker: what it answers, what it records, when it parks, and that it goes on serving."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from protocol.codec import decode_tensor
from protocol.contract import PUBLIC, Tasks
from protocol.envelope import MemoryNonceStore, open_envelope, seal_envelope
from protocol.identity import Identity
from protocol.messages import DatasetMeta, DPRelease, JobReply, KeepRelease, RawRelease, RunJob
from protocol.plan import InputRef, Plan, Ref, Step
from protocol.serving import Answer
from workers.config import ApprovalSection, BudgetSection
from workers.jobs.context import NodeContext
from workers.jobs.runner import JobRunner
from workers.policy.ledger import Ledger
from workers.storage.store import Store

NODE = Identity.generate("ward")
ALICE, BOB, MALLORY = Identity.generate("alice"), Identity.generate("bob"), Identity.generate("mallory")
DATA = torch.arange(12, dtype=torch.float32).reshape(6, 2)  # 6 rows of two columns in [0, 11]
MEAN = Plan(inputs=[InputRef(kind="dataset", name="births")], steps=[Step(op="mean", args=[Ref(ref=0)], params={})])


def make_runner(tmp_path: Path, approval: ApprovalSection) -> tuple[JobRunner, Store]:
    store = Store(tmp_path / "store", f"sqlite:///{tmp_path / 'node.db'}")
    meta = DatasetMeta(node="ward", name="births", shape=(6, 2), dtype="float32", bounds=[(0.0, 11.0)])
    store.put_dataset(meta, DATA, ["alice"], None)
    left: dict[str, bytes] = {}

    def claim_check(data: bytes) -> str:
        left[f"k{len(left)}"] = data
        return f"k{len(left) - 1}"

    node = NodeContext("ward", NODE, {"alice": ALICE.public, "bob": BOB.public}, store,
                       Ledger(store, "ward", BudgetSection(default_epsilon=1.0)), approval, claim_check, left.pop,
                       lambda name: pytest.fail(f"no other node's key is needed here, asked for {name}"))
    return JobRunner(node), store


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[tuple[JobRunner, Store]]:
    made = make_runner(tmp_path, ApprovalSection())
    yield made
    made[1].close()


def send(runner: JobRunner, body: Any, sender: Identity = ALICE, job_id: str = "ward:job-1") -> Answer:
    env = seal_envelope(sender, recipient="ward", kind=body.kind, job_id=job_id, body=body.model_dump(mode="json"),
                        now=time.time())
    return runner.answer(Tasks.RUN_JOB, env.model_dump(mode="json"), job_id)


def read(answer: Answer, reader: str = "alice") -> JobReply:
    """The reply as its requester reads it: signed by the node, addressed to them."""
    env = open_envelope(answer.signed, recipient=reader, keyring={"ward": NODE.public}, nonces=MemoryNonceStore(),
                        delivery_id="d", now=time.time())
    return JobReply.model_validate(env.body_json())


def value(reply: JobReply, who: Identity = ALICE) -> torch.Tensor:
    assert reply.value is not None and reply.value.sealed is not None
    return decode_tensor(who.unseal(base64.b64decode(reply.value.sealed)))


def test_an_allowed_user_gets_the_exact_value_signed_and_sealed(runner: tuple[JobRunner, Store]) -> None:
    reply = read(send(runner[0], RunJob(plan=MEAN, release=RawRelease())))
    assert reply.status == "done" and reply.error is None
    assert value(reply).item() == pytest.approx(5.5)


def test_a_redelivered_job_answers_with_its_recorded_reply_and_runs_once(runner: tuple[JobRunner, Store]) -> None:
    jobs, store = runner
    first = send(jobs, RunJob(plan=MEAN, release=KeepRelease()))
    again = send(jobs, RunJob(plan=MEAN, release=KeepRelease()))  # a new envelope (nonce), the same job id
    assert again.signed == first.signed
    assert store.count_objects("ward:job-1") == 1
    row = store.job("ward:job-1")
    assert row is not None and row.attempts == 1 and row.status == "done"


def test_an_unverifiable_message_is_refused_to_its_claimed_sender_and_not_recorded(
        runner: tuple[JobRunner, Store]) -> None:
    jobs, store = runner
    answer = send(jobs, RunJob(plan=MEAN, release=RawRelease()), sender=MALLORY, job_id="ward:m-1")
    reply = read(answer, reader="mallory")
    assert reply.status == "denied" and reply.error is not None and reply.error.code == "unknown_sender"
    assert store.job("ward:m-1") is None
    junk = jobs.answer(Tasks.RUN_JOB, {"sender": "../../etc", "job_id": "x"}, "delivery-9")
    assert json.loads(junk.signed["body"])["status"] == "failed" and junk.signed["recipient"] == PUBLIC


def test_raw_values_for_another_user_are_denied_naming_the_way_out(runner: tuple[JobRunner, Store]) -> None:
    reply = read(send(runner[0], RunJob(plan=MEAN, release=RawRelease()), sender=BOB), reader="bob")
    assert reply.status == "denied" and reply.error is not None
    assert "births" in reply.error.message and "differentially private" in reply.error.message


def test_a_dp_release_is_noisy_and_charged_once(runner: tuple[JobRunner, Store]) -> None:
    jobs, _ = runner
    reply = read(send(jobs, RunJob(plan=MEAN, release=DPRelease(epsilon=0.25)), sender=BOB), reader="bob")
    assert reply.status == "done" and reply.noise is not None and reply.noise.mechanism == "laplace"
    # one row replaced moves its 2 values by up to 11 each, in a mean of 12 values
    assert reply.noise.sensitivity == pytest.approx(2 * 11.0 / 12)
    spent = jobs.node.ledger.info("bob", "births")
    assert spent.spent_epsilon == pytest.approx(0.25) and spent.releases == 1
    send(jobs, RunJob(plan=MEAN, release=DPRelease(epsilon=0.25)), sender=BOB)  # redelivered: not charged again
    assert jobs.node.ledger.info("bob", "births").spent_epsilon == pytest.approx(0.25)


def test_a_kept_result_comes_back_as_a_pointer_ticket(runner: tuple[JobRunner, Store]) -> None:
    jobs, store = runner
    reply = read(send(jobs, RunJob(plan=MEAN, release=KeepRelease()), sender=BOB), reader="bob")
    assert reply.ticket is not None and reply.value is None
    obj, tensor = store.object(reply.ticket.object_id, "bob")
    assert obj.sources == ["births"] and tensor.item() == pytest.approx(5.5)


def test_a_parked_job_waits_then_runs_as_asked_once_approved(tmp_path: Path) -> None:
    jobs, store = make_runner(tmp_path, ApprovalSection(default="manual", auto=[]))
    answer = send(jobs, RunJob(plan=MEAN, release=RawRelease()))
    assert answer.parked and read(answer).status == "pending_approval"
    assert [r.job_id for r in jobs.requests.list("pending")] == ["ward:job-1"]
    again = send(jobs, RunJob(plan=MEAN, release=RawRelease()))  # redelivered while waiting: still parked
    assert again.parked
    jobs.requests.decide("ward:job-1", "approved")
    approved = jobs.run_approved("ward:job-1")
    assert value(read(Answer(approved))).item() == pytest.approx(5.5)
    assert not send(jobs, RunJob(plan=MEAN, release=RawRelease())).parked  # decided: the recorded reply
    store.close()


def test_a_bug_in_a_job_is_a_typed_failure_and_the_runner_goes_on(runner: tuple[JobRunner, Store],
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    jobs, store = runner

    def broken(*_: Any) -> Any:
        raise ZeroDivisionError("a bug")

    with monkeypatch.context() as patch:
        patch.setattr(jobs.compute, "run", broken)
        reply = read(send(jobs, RunJob(plan=MEAN, release=RawRelease())))
    assert reply.status == "failed" and reply.error is not None and reply.error.code == "job_failed"
    assert "ZeroDivisionError" in reply.error.message and "log" in reply.error.message
    assert "a bug" not in reply.error.message  # the details are for the owner's log
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)
    row = store.job("ward:job-1")
    assert row is not None and row.status == "failed"  # recorded: a redelivery answers the same
    assert read(send(jobs, RunJob(plan=MEAN, release=RawRelease()), job_id="ward:job-2")).status == "done"


def test_a_kind_the_node_does_not_serve_is_refused_naming_those_it_does(runner: tuple[JobRunner, Store]) -> None:
    env = seal_envelope(ALICE, recipient="ward", kind="mpc_deal", job_id="ward:j", body={"kind": "mpc_deal"},
                        now=time.time())
    reply = read(runner[0].answer(Tasks.RUN_JOB, env.model_dump(mode="json"), "ward:j"))
    assert reply.status == "failed" and reply.error is not None and reply.error.code == "invalid_request"
    assert "'mpc_deal'" in reply.error.message and "run, train" in reply.error.message
