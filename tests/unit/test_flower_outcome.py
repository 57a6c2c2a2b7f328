"""What Flower shows of how a job ended (issue 19): a refused job is a Celery ``SUCCESS``
like a served one (its result is the signed reply carrying the typed error), so the worker
names the outcome in a ``task-outcome`` event (``workers.tasks.outcome``) and Flower shows
that as the task's result (``ops.flower_app.format_task``): ``answered``, ``refused:
budget_exhausted``… — from the reply's status and error code, never its message or a value.
Real signed replies, Celery's own event state; no broker, no Flower process."""

from __future__ import annotations

import base64
import copy
import json
import logging
import time
from typing import Any

import pytest
from celery.events.state import State

from ops.flower_app import OUTCOME_STATE, TASKS_COLUMNS, format_task
from protocol.errors import (
    BadSignature,
    BudgetExhausted,
    GridError,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    RequestDenied,
)
from protocol.identity import Identity
from protocol.messages import GatewayReply, JobReply, NoiseInfo, SealedValue, WireError
from protocol.mpc.wire import MpcReply
from protocol.serving import EnvelopeServer
from workers.jobs.runner import failure
from workers.tasks import OUTCOME_EVENT, OUTCOME_FIELD, OUTCOMES, announce_outcome, outcome

NODE, ALICE = Identity.generate("hospital"), Identity.generate("alice")
SECRET = "3.4007"  # a released mean, say: what no summary may carry
SERVER = EnvelopeServer(NODE, nonces=None, failure=failure)  # type: ignore[arg-type]  # signing only


def signed(reply: Any) -> dict[str, Any]:
    return SERVER.sign("alice", "job-1", reply)


def refused(exc: GridError) -> dict[str, Any]:
    return signed(failure(exc, "job-1"))


SERVED = signed(JobReply(status="done", value=SealedValue(sealed=base64.b64encode(
    ALICE.public.seal(SECRET.encode())).decode()), noise=NoiseInfo(mechanism="laplace", epsilon=0.1, delta=0.0,
                                                                     scale=0.29, sensitivity=0.029)))


@pytest.mark.parametrize(("reply", "said"), [
    (SERVED, "answered"),
    (signed(JobReply(status="done")), "answered"),
    (refused(PermissionDenied(f"carol may not read it; the mean is {SECRET}")), "refused: permission_denied"),
    (refused(RequestDenied("the owner said no")), "refused: request_denied"),
    (refused(BudgetExhausted(f"ε {SECRET} left of 1")), "refused: budget_exhausted"),
    (refused(NotFound("no dataset 'x'")), "refused: not_found"),
    (refused(InvalidRequest("malformed")), "refused: invalid_request"),
    (refused(LimitExceeded("too big")), "refused: limit_exceeded"),
    (refused(BadSignature("forged")), "refused: bad_signature"),
    (refused(JobFailed(f"it broke at {SECRET}")), "failed: job_failed"),
    (refused(JobCancelled("cancelled")), "failed: job_cancelled"),
    (signed(JobReply(status="pending_approval")), "waiting: approval"),
    (signed(GatewayReply()), "answered"),
    (signed(GatewayReply(error=WireError(code="not_enrolled", message="who?"))), "refused: not_enrolled"),
    (signed(MpcReply()), "answered"),
    (signed(MpcReply(error=WireError(code="node_unavailable", message="a party is silent"))),
     "failed: node_unavailable"),
])
def test_the_outcome_names_how_the_job_ended_never_a_value(reply: dict[str, Any], said: str) -> None:
    assert outcome(reply) == said
    assert OUTCOMES.fullmatch(said)  # what Flower will show
    assert SECRET not in said and "sealed" not in said and "carol" not in said


def test_what_is_not_a_reply_of_the_grid_s_says_nothing_of_it() -> None:
    def body(data: Any) -> dict[str, Any]:
        return {**SERVED, "body": json.dumps(data)}

    assert outcome({}) == outcome({"body": "not json"}) == outcome(body([1, 2])) == "unknown"
    assert outcome(body({"error": {"code": f"leak_{SECRET}", "message": SECRET}})) == "failed: unknown"
    assert outcome(body({"error": {"code": "grid_error", "message": "?"}})) == "failed: unknown"
    assert outcome(body({"error": "budget_exhausted"})) == "failed: unknown"
    assert outcome(body({"status": "denied"})) == "refused: unknown"
    assert outcome(body({"status": "failed"})) == "failed: unknown"


class Request:
    is_eager = False
    hostname = "hospital@grid"


class FakeTask:
    """What ``announce_outcome`` uses of a Celery task: its request and send_event."""

    def __init__(self, broken: bool = False) -> None:
        self.request = Request()
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.broken = broken

    def send_event(self, type_: str, retry: bool = True, **fields: Any) -> None:
        if self.broken:
            raise ConnectionError("the broker is gone")
        assert retry is False  # the requester has the answer: the event does not hold the worker up
        self.sent.append((type_, fields))


def test_the_worker_announces_the_outcome_once_the_reply_is_stored(caplog: pytest.LogCaptureFixture) -> None:
    task = FakeTask()
    announce_outcome(task, refused(BudgetExhausted("none left")), "job-1", (), {})
    assert task.sent == [(OUTCOME_EVENT, {OUTCOME_FIELD: "refused: budget_exhausted"})]

    task.request.is_eager = True  # applied in this process: no worker, no event
    announce_outcome(task, SERVED, "job-2", (), {})
    assert len(task.sent) == 1

    with caplog.at_level(logging.WARNING, logger="workers.tasks"):
        announce_outcome(FakeTask(broken=True), SERVED, "job-3", (), {})  # the job is answered all the same
    assert "job-3: could not tell Flower how it ended" in caplog.text


def events(task_id: str, *kinds: str) -> list[dict[str, Any]]:
    """Celery task events of one job, as a worker sends them (``task-outcome`` from the pool
    process once the reply is stored, ``task-succeeded`` from the worker's parent)."""
    now = time.time()
    fields: dict[str, dict[str, Any]] = {
        "task-received": {"name": "gridq.node.run_job", "args": "[{'v': '1', ...}]", "kwargs": "{}"},
        "task-started": {"pid": 7},
        OUTCOME_EVENT: {OUTCOME_FIELD: "refused: budget_exhausted"},
        "task-succeeded": {"result": ", ...", "runtime": 0.02},  # resultrepr_maxsize=0: no reply
    }
    return [{"type": kind, "uuid": task_id, "hostname": "hospital@grid", "timestamp": now + i,
             "local_received": now + i, "clock": i + 1, **fields[kind]} for i, kind in enumerate(kinds)]


@pytest.mark.parametrize("order", [
    ("task-received", "task-started", OUTCOME_EVENT, "task-succeeded"),
    ("task-received", OUTCOME_EVENT, "task-started", "task-succeeded"),  # the pool process was quicker
    ("task-received", "task-started", "task-succeeded", OUTCOME_EVENT),
])
def test_flower_shows_the_outcome_as_the_result_of_a_success(order: tuple[str, ...]) -> None:
    state = State()
    for event in events("job-1", *order):
        state.event(event)
    task = state.tasks["job-1"]
    assert task.state == "SUCCESS"
    shown = format_task(copy.copy(task))  # Flower formats a copy (made of the task's declared fields)
    assert (shown.name, shown.state, shown.result) == ("gridq.node.run_job", "SUCCESS", "refused: budget_exhausted")
    assert getattr(shown, OUTCOME_FIELD) is None  # shown once, as the result
    assert shown.as_dict()["result"] == "refused: budget_exhausted"
    assert task.result == ", ..."  # Celery's own view of the task is left as it was


def test_a_task_whose_last_event_is_its_outcome_shows_as_the_success_it_is() -> None:
    state = State()
    for event in events("job-1", "task-received", "task-started", OUTCOME_EVENT):  # task-succeeded not yet in
        state.event(event)
    task = state.tasks["job-1"]
    assert task.state == OUTCOME_STATE
    assert (format_task(copy.copy(task)).state, format_task(copy.copy(task)).result) == (
        "SUCCESS", "refused: budget_exhausted")


@pytest.mark.parametrize("forged", [f"refused: {SECRET}", "answered <script>alert(1)</script>", 42, "x" * 500,
                                    "refused: budget_exhausted\n3.4007"])
def test_an_outcome_that_is_not_one_of_the_words_is_not_shown(forged: Any) -> None:
    state = State()
    for event in events("job-1", "task-received", "task-started", "task-succeeded"):
        state.event(event)
    state.event({**events("job-1", OUTCOME_EVENT)[0], OUTCOME_FIELD: forged, "clock": 9})
    shown = format_task(copy.copy(state.tasks["job-1"]))
    assert (shown.state, shown.result, getattr(shown, OUTCOME_FIELD)) == ("SUCCESS", ", ...", None)


def test_the_task_list_has_a_result_column() -> None:
    from flower.options import options
    from flower.views.tasks import visible_task_columns

    assert options.format_task is format_task
    assert ("result", "Result") in visible_task_columns(TASKS_COLUMNS)
    assert [n for n, _ in visible_task_columns(TASKS_COLUMNS)] == TASKS_COLUMNS.split(",")
