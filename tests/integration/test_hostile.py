"""Hostile input: each bad message gets its typed error at the client, and the same
worker then answers the next valid job correctly."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import torch

from ops.local import LocalGrid
from orchestrator.grid import Grid
from protocol import errors
from protocol.contract import Tasks, node_queue
from protocol.envelope import MAX_BODY_CHARS, seal_envelope
from protocol.identity import Identity
from protocol.messages import RawRelease, RunJob
from protocol.plan import InputRef, Plan, Step

DATASET = InputRef(kind="dataset", name="birth-records-feb")
MEAN = Plan(inputs=[DATASET], steps=[Step(op="mean", args=[{"ref": 0}])])


def _envelope(grid: Grid, body: Any, *, job_id: str | None = None, recipient: str = "hospital",
              now: float | None = None, ttl: float = 600.0, identity: Identity | None = None) -> dict[str, Any]:
    env = seal_envelope(identity or grid.identity, recipient=recipient, kind="run",
                        job_id=job_id or f"hospital:{uuid.uuid4().hex}", body=body,
                        now=time.time() if now is None else now, ttl=ttl)
    return env.model_dump(mode="json")


def _envelope_text(grid: Grid, text: str) -> dict[str, Any]:
    """A correctly signed envelope whose body is not JSON at all."""
    from protocol.envelope import Envelope
    from protocol.identity import _b64

    env = Envelope.model_validate({**_envelope(grid, {}), "body": text, "signature": ""})
    return env.model_copy(update={"signature": _b64(grid.identity.sign(env.signed_bytes()))}).model_dump(mode="json")


def _send(grid: Grid, envelope: dict[str, Any], task_id: str | None = None) -> Any:
    task_id = task_id or envelope.get("job_id") or f"hospital:{uuid.uuid4().hex}"
    grid.transport.mark_sent([task_id])
    grid.app.send_task(Tasks.RUN_JOB, args=[envelope], queue=node_queue("hospital"), task_id=task_id)
    return grid.ticket(task_id)


def _job(plan: Plan = MEAN) -> dict[str, Any]:
    return RunJob(plan=plan, release=RawRelease()).model_dump(mode="json")


def _forged(g: Grid) -> dict[str, Any]:
    env = _envelope(g, _job())
    env["body"] = env["body"].replace('"mean"', '"sum"')  # tampered after signing
    return env


def _replayed(g: Grid) -> tuple[dict[str, Any], str]:
    env = _envelope(g, _job())
    _send(g, env).wait()  # the original goes through …
    return env, f"hospital:{uuid.uuid4().hex}"  # … the same envelope in a new message does not


def _oversized(g: Grid) -> dict[str, Any]:
    env = _envelope(g, _job())
    env["body"] = " " * (MAX_BODY_CHARS + 1)
    return env


def _malformed(g: Grid) -> dict[str, Any]:
    return _envelope(g, {"kind": "run", "plan": {"inputs": "not a list"}})


def _forbidden(name: str) -> Callable[[Grid], dict[str, Any]]:
    return lambda g: _envelope(g, _job(Plan(inputs=[DATASET], steps=[Step(op=name, args=[{"ref": 0}])])))


CASES: dict[str, tuple[Callable[[Grid], Any], type[errors.GridError]]] = {
    "forged signature": (_forged, errors.BadSignature),
    "replay": (_replayed, errors.ReplayedNonce),
    "expired": (lambda g: _envelope(g, _job(), now=time.time() - 3600, ttl=60), errors.MessageExpired),
    "wrong recipient": (lambda g: _envelope(g, _job(), recipient="clinic"), errors.WrongRecipient),
    "oversized": (_oversized, errors.InvalidRequest),
    "malformed body": (_malformed, errors.InvalidRequest),
    "body not JSON": (lambda g: _envelope_text(g, "{not json"), errors.InvalidRequest),
    "not an envelope": (lambda g: {"hello": "world"}, errors.InvalidRequest),
    "forbidden os.system": (_forbidden("os.system"), errors.ForbiddenOperation),
    "forbidden eval": (_forbidden("eval"), errors.ForbiddenOperation),
    "forbidden torch.load": (_forbidden("torch.load"), errors.ForbiddenOperation),
    "forbidden __import__": (_forbidden("__import__"), errors.ForbiddenOperation),
    "forbidden getattr": (_forbidden("getattr"), errors.ForbiddenOperation),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_message_gets_typed_error_and_worker_goes_on(local_grid: LocalGrid, births_feb, case: str):
    make, expected = CASES[case]
    worker_pid = local_grid.procs["hospital"].pid
    with local_grid.connect("alice") as grid:
        made = make(grid)
        envelope, task_id = made if isinstance(made, tuple) else (made, None)
        with pytest.raises(expected) as caught:
            _send(grid, envelope, task_id).wait(timeout=30)
        assert caught.type is expected or expected is errors.InvalidRequest
        assert str(caught.value)  # a message a person can act on
        # the same worker answers the next valid job, correctly
        births = grid.search("#birth-records", "#february")["hospital"][0]
        assert births["weight"].mean().get().item() == births_feb[:, 0].mean().item()
    assert local_grid.procs["hospital"].poll() is None and local_grid.procs["hospital"].pid == worker_pid


def test_forbidden_operation_names_the_operation(local_grid: LocalGrid):
    with local_grid.connect("alice") as grid:
        with pytest.raises(errors.ForbiddenOperation, match="os.system"):
            _send(grid, _forbidden("os.system")(grid)).wait(timeout=30)


def test_unknown_user_is_refused_and_told_why(local_grid: LocalGrid, births_feb):
    with local_grid.connect("mallory") as grid:  # a key the hospital has never heard of
        births = grid.search("#birth-records", "#february")["hospital"][0]
        with pytest.raises(errors.UnknownSender, match="mallory"):
            births.mean().get()
        with pytest.raises(errors.UnknownSender):
            births.mean().submit().wait()


def test_a_key_that_claims_a_known_name_is_a_bad_signature(local_grid: LocalGrid):
    impostor = Identity.generate("alice")  # right name, wrong key
    with local_grid.connect("alice") as grid:
        with pytest.raises(errors.BadSignature):
            _send(grid, _envelope(grid, _job(), identity=impostor)).wait(timeout=30)


def test_a_job_delivered_twice_has_the_effect_of_one(local_grid: LocalGrid, births_feb):
    from workers.storage.store import Store

    with local_grid.connect("alice") as grid:
        env = _envelope(grid, RunJob(plan=MEAN).model_dump(mode="json"))
        first = _send(grid, env).result(timeout=30)
        # the broker hands the same message out again (acks_late redelivery): same task id
        grid.app.backend.forget(env["job_id"])
        again = _send(grid, env, task_id=env["job_id"]).result(timeout=30)
        assert again.name == first.name
        assert torch.equal(again.get(), births_feb.mean())
    store = Store(local_grid.home / "hospital", f"sqlite:///{local_grid.home / 'hospital' / 'node.db'}")
    try:
        job = store.job(env["job_id"])
        assert job is not None and job.attempts == 1 and job.status == "done"
        assert store.count_objects(env["job_id"]) == 1
    finally:
        store.close()


def test_a_signed_reply_moved_onto_another_jobs_key_is_refused(local_grid: LocalGrid, births_feb):
    """Issue 15: whoever can write the result backend copies the node's genuine, signed answer
    to job A onto job B's key. The client must not return A's answer as B's."""
    with local_grid.connect("alice") as grid:
        births = grid.search("#birth-records", "#february")["hospital"][0]
        a, b = births["weight"].mean().submit(epsilon=None), births["height"].mean().submit(epsilon=None)
        a.wait(timeout=30), b.wait(timeout=30)
        backend = grid.app.backend
        backend.client.set(backend.get_key_for_task(b.id), backend.client.get(backend.get_key_for_task(a.id)))
    with local_grid.connect("alice") as fresh:  # another process, which never saw A's reply
        with pytest.raises(errors.MisdirectedReply, match=f"stored for job {b.id} is 'hospital'.*answer to job {a.id}"):
            fresh.ticket(b.id).value(timeout=30)
        assert torch.allclose(fresh.ticket(a.id).result(timeout=30).get(), births_feb[:, 0].mean())


def test_a_gateway_answer_moved_onto_another_questions_key_is_refused(local_grid: LocalGrid, monkeypatch):
    """Issue 15: the gateway's signed answer to one question (an old node list, a search)
    copied onto another question's result key is not taken as the answer to it."""
    import orchestrator.transport as transport_module

    with local_grid.connect("alice") as grid:
        first = uuid.uuid4()
        grid.app.send_task(Tasks.NODES, queue="gateway", task_id=first.hex)
        assert grid.transport.result(first.hex, timeout=30) is not None
        backend = grid.app.backend
        second = uuid.uuid4()
        key = backend.get_key_for_task
        backend.client.set(key(second.hex), backend.client.get(key(first.hex)))
        monkeypatch.setattr(transport_module.uuid, "uuid4", lambda: second)  # the id of the next question
        with pytest.raises(errors.MisdirectedReply, match=f"answer to job {first.hex}"):
            grid.transport.nodes()


def test_an_unsigned_failure_in_the_backend_decides_nothing(local_grid: LocalGrid, ward, monkeypatch):
    """Issue 15: a FAILURE state written to the backend (by anything with broker access, or by
    a dying worker) is not the node's answer: the ticket waits on for a signed one."""
    from workers import Node

    with local_grid.connect("carol") as grid:
        ticket = grid.search("#ward")["ward"][0]["weight"].mean().submit()  # parked: a manual-approval node
        deadline = time.monotonic() + 30
        while ticket.status != "pending_approval" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ticket.status == "pending_approval"  # on the node's signed word
        grid.app.backend.store_result(ticket.id, RuntimeError("forged: the job failed"), "FAILURE")
        assert ticket.status == "running"
        with pytest.raises(errors.NodeUnavailable, match="says FAILURE, unsigned, which proves nothing"):
            ticket.wait(timeout=1)
        monkeypatch.setenv("GRIDQ_HOME", str(local_grid.home))
        monkeypatch.setenv("GRIDQ_BROKER", local_grid.url)
        owner = Node.from_config(ward)
        try:
            owner.approve(ticket.id)  # the node's signed answer replaces the forged state
        finally:
            owner.close()
        assert ticket.wait(timeout=30).status == "done" and ticket.result().shape == ()
