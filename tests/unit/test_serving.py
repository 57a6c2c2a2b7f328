"""The one serving path (protocol.serving): open → route → sign, and its one error policy,
the same for a node's jobs, its MPC roles and the gateway."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from protocol.contract import PUBLIC
from protocol.envelope import Envelope, MemoryNonceStore, open_envelope, seal_envelope
from protocol.errors import GridError, NotFound
from protocol.identity import Identity
from protocol.serving import Answer, EnvelopeServer, Route

SERVER, ALICE = Identity.generate("host"), Identity.generate("alice")


class Echo(BaseModel):
    kind: Literal["echo"] = "echo"
    text: str


class Reply(BaseModel):
    kind: Literal["reply"] = "reply"
    text: str = ""
    error: str | None = None


class Stop(Exception):  # noqa: N818 - control flow, like a parked job
    pass


class TimeUp(Exception):  # noqa: N818 - stands for Celery's SoftTimeLimitExceeded
    pass


def failure(exc: GridError, job_id: str) -> Reply:
    return Reply(error=f"{exc.code}: {exc.message}")


def serve(run: Any, *, sender: Identity = ALICE, body: dict[str, Any] | None = None,
          server: EnvelopeServer | None = None) -> dict[str, Any]:
    """Send ``body`` (an echo by default) to a server whose one route runs ``run``; the reply body."""
    server = server or EnvelopeServer(SERVER, MemoryNonceStore(), failure, passthrough=(Stop,), time_limits=(TimeUp,))
    env = seal_envelope(sender, recipient="host", kind="echo", job_id="j-1", now=time.time(),
                        body=body if body is not None else {"kind": "echo", "text": "hi"})
    routes = {"echo": Route(Echo, run)}
    answer = server.open_and_answer(env.model_dump(mode="json"), "j-1", {"alice": ALICE.public},
                          lambda opened: server.reply(opened, routes))
    assert isinstance(answer, Answer) and not answer.parked
    opened = open_envelope(answer.signed, recipient=answer.signed["recipient"], keyring={"host": SERVER.public},
                           nonces=MemoryNonceStore(), delivery_id="d", now=time.time())
    return {"to": opened.recipient, **json.loads(opened.body)}


def test_a_verified_message_is_routed_by_kind_and_answered_signed_to_its_sender() -> None:
    def echo(env: Envelope, body: Echo) -> Reply:
        return Reply(text=f"{env.sender} said {body.text}")

    assert serve(echo) == {"to": "alice", "kind": "reply", "text": "alice said hi", "error": None}


def test_what_cannot_be_verified_is_refused_to_its_claimed_sender_without_running() -> None:
    ran: list[str] = []
    reply = serve(lambda env, body: ran.append("ran"), sender=Identity.generate("mallory"))
    assert reply["to"] == "mallory" and reply["error"].startswith("unknown_sender:") and ran == []


def test_junk_is_refused_to_the_public() -> None:
    server = EnvelopeServer(SERVER, MemoryNonceStore(), failure)
    answer = server.open_and_answer({"sender": "no such/name", "job_id": 7}, "d-1", {}, lambda env: pytest.fail("ran"))
    # signed for the delivery it answers (where it is stored), not for the job the junk claims
    assert answer.signed["recipient"] == PUBLIC and answer.signed["job_id"] == "d-1"
    assert json.loads(answer.signed["body"])["error"].startswith("invalid_request: malformed envelope")


def test_a_grid_error_answers_as_itself() -> None:
    def missing(env: Envelope, body: Echo) -> Reply:
        raise NotFound("no such model")

    assert serve(missing)["error"] == "not_found: no such model"


def test_a_bug_answers_at_once_as_job_failed_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    def bug(env: Envelope, body: Echo) -> Reply:
        raise KeyError("secret detail")

    error = serve(bug)["error"]
    assert error.startswith("job_failed:") and "KeyError" in error and "log" in error
    assert "secret detail" not in error
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)


def test_the_time_limit_answers_as_job_failed_and_control_flow_passes_through() -> None:
    def slow(env: Envelope, body: Echo) -> Reply:
        raise TimeUp()

    assert "time limit" in serve(slow)["error"]

    def stop(env: Envelope, body: Echo) -> Reply:
        raise Stop()

    with pytest.raises(Stop):
        serve(stop)


def test_a_malformed_body_or_an_unknown_kind_is_an_invalid_request() -> None:
    assert serve(lambda env, body: Reply(), body={"kind": "echo"})["error"].startswith(
        "invalid_request: malformed Echo message: text")
    server = EnvelopeServer(SERVER, MemoryNonceStore(), failure)
    env = seal_envelope(ALICE, recipient="host", kind="shutdown", job_id="j", body={}, now=time.time())
    answer = server.open_and_answer(env.model_dump(mode="json"), "j", {"alice": ALICE.public},
                          lambda opened: server.reply(opened, {"echo": Route(Echo, lambda e, b: Reply())}))
    assert "does not take 'shutdown' messages here; it takes echo" in json.loads(answer.signed["body"])["error"]


def test_the_node_shell_builds_the_role_after_the_fork_and_parks_what_waits() -> None:
    """workers.tasks.answer_tasks, with the task applied in this process (no broker: this is
    the shell's logic; the queue itself is the integration tests')."""
    from celery import Celery
    from celery.signals import worker_process_init

    from workers.tasks import answer_tasks

    built: list[int] = []

    class Role:
        def __init__(self) -> None:
            built.append(len(built))
            self.number = len(built)

        def answer(self, task: str, payload: Any, delivery_id: str) -> Answer:
            return Answer({"task": task, "payload": payload, "role": self.number}, parked=payload == "wait")

    app = Celery("serving-test", set_as_current=False)
    answer_tasks(app, ["t.one", "t.two"], Role)
    assert built == []  # nothing is built where tasks are only registered (the parent process)
    assert app.tasks["t.one"].apply(args=["x"]).get() == {"task": "t.one", "payload": "x", "role": 1}
    assert app.tasks["t.two"].apply(args=["y"]).get()["role"] == 1  # one role serves every task
    worker_process_init.send(sender=None)  # a pool process starts: its own role, built now
    assert built == [0, 1]
    assert app.tasks["t.one"].apply(args=["z"]).get()["role"] == 2
    parked = app.tasks["t.one"].apply(args=["wait"])
    assert parked.state == "IGNORED"  # the task leaves its PENDING_APPROVAL state standing
