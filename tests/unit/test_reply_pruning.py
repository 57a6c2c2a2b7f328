"""A node drops the reply bodies of jobs past its ``[retention] replies``, a bounded batch at
a time, as its worker serves; the job rows stay with their status, charges and approval
requests stay, a pruned job delivered again is never run again, and parked jobs keep their
answer (signed to stay valid a day, not the few minutes of an ordinary reply)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from protocol.contract import Tasks
from protocol.envelope import MAX_TTL_SECONDS, Envelope, MemoryNonceStore, open_envelope, seal_envelope
from protocol.errors import InvalidRequest
from protocol.identity import Identity
from protocol.messages import DatasetMeta, DPRelease, JobReply, RawRelease, RunJob
from protocol.plan import InputRef, Plan, Ref, Step
from protocol.serving import Answer
from workers.config import ApprovalSection, BudgetSection, RetentionSection
from workers.jobs.context import NodeContext
from workers.jobs.runner import JobRunner
from workers.policy.ledger import Ledger
from workers.storage.store import Store

NODE = Identity.generate("ward")
ALICE, BOB = Identity.generate("alice"), Identity.generate("bob")
MEAN = Plan(inputs=[InputRef(kind="dataset", name="births")], steps=[Step(op="mean", args=[Ref(ref=0)], params={})])
RETENTION = RetentionSection(results=30, replies=60, prune_every=10, prune_batch=4)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, approval: ApprovalSection) -> tuple[JobRunner, Store, Clock]:
    store = Store(tmp_path / "store", f"sqlite:///{tmp_path / 'node.db'}")
    meta = DatasetMeta(node="ward", name="births", shape=(6, 2), dtype="float32", bounds=[(0.0, 11.0)])
    store.put_dataset(meta, torch.arange(12, dtype=torch.float32).reshape(6, 2), ["alice"], None)
    node = NodeContext("ward", NODE, {"alice": ALICE.public, "bob": BOB.public}, store,
                       Ledger(store, "ward", BudgetSection(default_epsilon=10.0)), approval,
                       lambda data: pytest.fail("no claim-check here"), lambda key: pytest.fail("no claim-check"),
                       lambda name: pytest.fail(f"no other node's key is needed, asked for {name}"),
                       retention=RETENTION)
    runner = JobRunner(node)
    clock = Clock()
    runner.pruner.clock = clock
    return runner, store, clock


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[JobRunner, Store, Clock]]:
    made = make(tmp_path, ApprovalSection())
    yield made
    made[1].close()


def envelope(body: Any, job_id: str, sender: Identity = ALICE) -> dict[str, Any]:
    return seal_envelope(sender, recipient="ward", kind=body.kind, job_id=job_id, body=body.model_dump(mode="json"),
                         now=time.time()).model_dump(mode="json")


def serve(runner: JobRunner, raw: dict[str, Any], job_id: str) -> Answer:
    return runner.answer(Tasks.RUN_JOB, raw, job_id)


def read(answer: Answer, reader: str) -> tuple[Envelope, JobReply]:
    env = open_envelope(answer.signed, recipient=reader, keyring={"ward": NODE.public}, nonces=MemoryNonceStore(),
                        delivery_id="d", now=time.time())
    return env, JobReply.model_validate(env.body_json())


def kept(store: Store) -> int:
    with sqlite3.connect(store.engine.url.database or "") as db:
        return int(db.execute("SELECT count(*) FROM jobs WHERE reply IS NOT NULL").fetchone()[0])


def test_replies_past_the_retention_go_in_batches_and_the_rows_stay(node: tuple[JobRunner, Store, Clock]) -> None:
    runner, store, clock = node
    jobs = {f"ward:raw-{i}": RunJob(plan=MEAN, release=RawRelease()) for i in range(4)}
    jobs |= {f"ward:dp-{i}": RunJob(plan=MEAN, release=DPRelease(epsilon=0.1)) for i in range(4)}
    for job_id, body in jobs.items():
        env, reply = read(serve(runner, envelope(body, job_id), job_id), "alice")
        assert reply.status == "done"
        assert env.expires_at - env.issued_at == pytest.approx(RETENTION.results)  # readable as long as it is kept
    refused = serve(runner, envelope(RunJob(plan=MEAN, release=RawRelease()), "ward:bob-1", BOB), "ward:bob-1")
    assert read(refused, "bob")[1].status == "denied"
    assert kept(store) == 9

    clock.now += RETENTION.replies - 5  # not yet: the next job prunes nothing
    serve(runner, envelope(RunJob(plan=MEAN, release=RawRelease()), "ward:late"), "ward:late")
    assert kept(store) == 10
    # past the retention of every reply recorded so far (the store's clock is the real one,
    # the pruner's is ahead), but a pass is due only every prune_every seconds
    clock.now += 6
    serve(runner, envelope(RunJob(plan=MEAN, release=RawRelease()), "ward:a"), "ward:a")
    assert kept(store) == 11
    clock.now += RETENTION.prune_every
    served = 11
    for expected in (8, 5, 2, 0):  # each job: its reply, and a batch of 4 gone (a full batch: behind, prune again)
        served += 1
        serve(runner, envelope(RunJob(plan=MEAN, release=RawRelease()), f"ward:{served}"), f"ward:{served}")
        assert kept(store) == expected
    serve(runner, envelope(RunJob(plan=MEAN, release=RawRelease()), "ward:z"), "ward:z")
    assert kept(store) == 1  # caught up: the next pass is prune_every seconds away
    for job_id in [*jobs, "ward:bob-1"]:
        row = store.job(job_id)
        assert row is not None and row.reply is None and row.status in ("done", "denied")
    assert runner.node.ledger.info("alice", "births").releases == 4  # the charges stay


def test_a_pruned_job_delivered_again_is_answered_not_run(node: tuple[JobRunner, Store, Clock]) -> None:
    runner, store, clock = node
    raw = envelope(RunJob(plan=MEAN, release=DPRelease(epsilon=0.5)), "ward:dp")
    assert read(serve(runner, raw, "ward:dp"), "alice")[1].noise is not None
    clock.now += RETENTION.replies + 1
    serve(runner, envelope(RunJob(plan=MEAN, release=RawRelease()), "ward:other"), "ward:other")  # prunes
    assert store.job("ward:dp").reply is None  # type: ignore[union-attr]
    again = read(serve(runner, raw, "ward:dp"), "alice")[1]  # the same delivery again (acks_late)
    assert again.status == "failed" and again.error is not None and "no longer kept" in again.error.message
    info = runner.node.ledger.info("alice", "births")
    assert info.releases == 1 and info.spent_epsilon == pytest.approx(0.5)  # charged once
    row = store.job("ward:dp")
    assert row is not None and row.status == "done" and row.attempts == 1


def test_parked_jobs_keep_their_answer_valid_for_a_day(tmp_path: Path) -> None:
    runner, store, clock = make(tmp_path, ApprovalSection(default="manual", auto=[]))
    answer = serve(runner, envelope(RunJob(plan=MEAN, release=RawRelease()), "ward:parked", BOB), "ward:parked")
    env, reply = read(answer, "bob")
    assert answer.parked and reply.status == "pending_approval"
    assert env.expires_at - env.issued_at == pytest.approx(MAX_TTL_SECONDS)
    clock.now += RETENTION.replies * 100
    assert runner.pruner.tick() == 0
    row = store.job("ward:parked")
    assert row is not None and row.reply == answer.signed  # a redelivery still answers that it is parked
    store.close()


def test_a_pruning_pass_reads_only_the_replies_still_kept(node: tuple[JobRunner, Store, Clock]) -> None:
    _, store, _ = node
    with sqlite3.connect(store.engine.url.database or "") as db:
        plan = db.execute("EXPLAIN QUERY PLAN SELECT jobs.job_id FROM jobs WHERE jobs.reply IS NOT NULL AND "
                          "jobs.updated_at < 1 AND jobs.status IN ('done', 'failed', 'denied') "
                          "ORDER BY jobs.updated_at LIMIT 10").fetchall()
    assert "ix_jobs_unpruned" in str(plan)  # the pruned rows are not in it: a pass never scans them


def test_the_space_of_pruned_replies_is_used_again(tmp_path: Path) -> None:
    """node.db does not grow by the replies it no longer keeps: after pruning, the next jobs'
    replies go where the pruned ones were (an UPDATE to NULL would leave that space unused)."""
    store = Store(tmp_path / "store", f"sqlite:///{tmp_path / 'node.db'}")
    reply = {"body": "x" * 1000}

    def jobs(first: int) -> int:
        """Pages of node.db (used or free) after 2000 more jobs, their replies pruned."""
        for i in range(first, first + 2000):
            store.begin_job(f"job-{i}", "alice")
            store.finish_job(f"job-{i}", "done", reply)
        while store.prune_replies(time.time() + 1, 500):
            pass
        with sqlite3.connect(store.engine.url.database or "") as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return int(db.execute("PRAGMA page_count").fetchone()[0])

    first, second, third = jobs(0), jobs(2000), jobs(4000)
    assert first > 2000 * 1000 / 4096  # the replies of one round took ~500 pages …
    assert third < 1.3 * first, (first, second, third)  # … and the next rounds' went there (an UPDATE: 3×)
    assert [store.job(f"job-{i}").status for i in (0, 5999)] == ["done", "done"]  # type: ignore[union-attr]
    store.close()


def test_replies_must_be_kept_as_long_as_results() -> None:
    with pytest.raises(ValueError, match="at least as long as results"):
        RetentionSection(results=600, replies=60)
    with pytest.raises(ValueError):
        RetentionSection(results=MAX_TTL_SECONDS + 1, replies=MAX_TTL_SECONDS + 1)  # no envelope lives longer
    assert RetentionSection().results == 600 and RetentionSection().replies == 24 * 3600
    InvalidRequest  # noqa: B018 - config errors reach the owner as InvalidRequest (workers.config.load_config)
