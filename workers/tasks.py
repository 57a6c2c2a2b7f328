"""The Celery shell of every gridq worker (a node's jobs, its MPC worker, the gateway): task
names registered on an app, each answered by one role per pool process; what the worker
pops is screened first (``workers.inbox``); a parked job's task stays ``PENDING_APPROVAL``
until the owner decides; a deferred one goes back on its queue (``workers.jobs.slots``).

A refused job is a Celery ``SUCCESS`` as much as a served one: its result is the signed reply
that carries the typed error, which the client reads. So that an operator can tell them apart
in Flower, a worker announces how each answered job ended (:func:`outcome`: ``answered``,
``refused: budget_exhausted``, ``failed: job_failed``…) in a Celery event of its own,
:data:`OUTCOME_EVENT`, once the reply is stored; ``ops.flower_app`` shows it as the task's
result. The reply's status and error code only: never its message, a value or a figure."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from celery import Celery
from celery.app import trace
from celery.exceptions import Ignore
from celery.signals import worker_process_init

from protocol.contract import PENDING_APPROVAL, QUIET_SUCCESS_LOG
from protocol.errors import ERRORS_BY_CODE, GridError, JobFailed, NodeUnavailable
from protocol.inbox import DEFAULT_MAX_DELIVERIES, DELIVERY, GIVEN_UP
from protocol.messages import JobStatus
from protocol.serving import PerProcess, R, Signed
from workers.broker import replicated_results
from workers.inbox import given_up_reason, screened

log = logging.getLogger(__name__)
DEFER_PAUSE = 0.2  # seconds a deferred message waits before it goes back on the queue

OUTCOME_EVENT = "task-outcome"  # a custom Celery task event (Celery's event state calls the task OUTCOME)
OUTCOME_FIELD = "outcome"  # the event's one field of gridq's: what :func:`outcome` says
# every word :func:`outcome` can say; what Flower shows is checked against it (an event can be forged by
# anyone who may publish events, as Celery's own can: nothing else of it is shown)
OUTCOMES = re.compile(r"answered|waiting: approval|unknown|(?:refused|failed): [a-z][a-z0-9_]{0,63}")
_FAILURES = (JobFailed, NodeUnavailable)  # it ran, or tried to, and failed; every other error is a refusal


def answer_tasks(app: Celery, tasks: Iterable[str], build: Callable[[], R],
                max_deliveries: int = DEFAULT_MAX_DELIVERIES) -> PerProcess[R]:
    """Register ``tasks`` on ``app``, each answered by the role ``build`` makes once per pool
    process; that role is returned, for what else a process does with it."""
    tasks = tuple(tasks)
    screened(app, tasks, max_deliveries)
    replicated_results(app)  # on a Sentinel broker, a result counts as stored once a replica holds it
    role: PerProcess[R] = PerProcess(build)
    worker_process_init.connect(role.after_fork, weak=False)
    trace.LOG_SUCCESS = QUIET_SUCCESS_LOG  # read at each log call: the pool processes forked later inherit it

    for name in tasks:
        @app.task(name=name, bind=True, on_success=announce_outcome)
        def run(self: Any, payload: Any = None) -> Signed:
            if getattr(self.request, GIVEN_UP, False):  # the screen marked it: answer, do not run it again
                deliveries = int(getattr(self.request, DELIVERY)) - 1
                failure = JobFailed(f"this job was {given_up_reason(deliveries)}; its owner's log says why. Make "
                                    "it smaller or ask the owner", job_id=self.request.id)
                return role().server.refuse(payload, self.request.id, failure).signed
            answer = role().answer(self.name, payload, self.request.id)
            if answer.deferred:  # its requester holds their share of this worker: behind the others it goes
                log.info("%s deferred: its requester holds their share of this worker's processes", self.request.id)
                time.sleep(DEFER_PAUSE)  # an otherwise idle queue does not spin
                self.app.send_task(self.name, args=[payload], task_id=self.request.id,
                                   queue=self.request.delivery_info["routing_key"])
                raise Ignore()
            if answer.parked:  # the decision is stored under this task's id when the owner makes it
                without_expiry(self.app.backend, lambda: self.update_state(state=PENDING_APPROVAL, meta=answer.signed))
                raise Ignore()
            return answer.signed

    return role


def outcome(signed: Mapping[str, Any]) -> str:
    """How the reply ``signed`` ends its job, in words an operator may read: ``answered``;
    ``refused: <code>`` (the worker would not: permission, budget, a malformed or oversized
    request, no such dataset, a message it could not trust…); ``failed: <code>`` (it ran, or
    tried to, and failed: ``job_failed``, ``job_cancelled``, ``node_unavailable``); ``waiting:
    approval`` (parked for the owner); ``unknown`` (no reply body it can read).

    From the reply body's ``status`` and its error's ``code`` (one of :mod:`protocol.errors`'
    codes, else ``unknown``) only: never the error's message, which is for the requester, nor
    anything else of the reply."""
    try:
        body = json.loads(signed["body"])
    except (KeyError, TypeError, ValueError, RecursionError):
        return "unknown"
    if not isinstance(body, dict):
        return "unknown"
    error = body.get("error")
    if error is not None:
        code = error.get("code") if isinstance(error, dict) else None
        kind = ERRORS_BY_CODE.get(code) if isinstance(code, str) else None
        if kind is None or kind is GridError:  # no code of the grid's: nothing said of what happened
            return "failed: unknown"
        return f"{'failed' if issubclass(kind, _FAILURES) else 'refused'}: {kind.code}"
    if body.get("status") == JobStatus.PENDING_APPROVAL:
        return "waiting: approval"
    if body.get("status") in ("failed", "denied"):  # a reply says so with an error: without one, say no more
        return f"{'refused' if body['status'] == 'denied' else 'failed'}: unknown"
    return "answered"


def announce_outcome(task: Any, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
    """The task's ``on_success``: once its reply is stored, tell Flower how the job ended (an
    :data:`OUTCOME_EVENT` naming :func:`outcome`). The requester has the answer already, so a
    broker that will not take the event costs a warning, never the job; a task applied in
    this process (no worker) sends nothing."""
    if task.request.is_eager or not isinstance(retval, Mapping):
        return
    try:
        task.send_event(OUTCOME_EVENT, retry=False, **{OUTCOME_FIELD: outcome(retval)})
    except Exception as exc:  # the job is answered: Flower missing a word of it is not its failure
        log.warning("%s: could not tell Flower how it ended: %r", task_id, exc)


def without_expiry(backend: Any, store: Callable[[], None]) -> None:
    """Run ``store`` with the result backend's expiry off: a parked job's state waits in the
    backend for as long as its owner takes to decide (the answer then stored has the TTL,
    ``result_expires``). The Redis backend reads ``expires`` at each write; a pool process
    runs one task at a time."""
    expires = backend.expires
    backend.expires = 0  # 0: SET, not SETEX (celery.backends.redis.RedisBackend._set)
    try:
        store()
    finally:
        backend.expires = expires
