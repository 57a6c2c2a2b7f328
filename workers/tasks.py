"""The Celery shell of every gridq worker (a node's jobs, its MPC worker, the gateway): task
names registered on an app, each answered by one role per pool process; what the worker
pops is screened first (``workers.inbox``); a parked job's task stays ``PENDING_APPROVAL``
until the owner decides; a deferred one goes back on its queue (``workers.slots``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from celery import Celery
from celery.app import trace
from celery.exceptions import Ignore
from celery.signals import worker_process_init

from protocol.contract import PENDING_APPROVAL, QUIET_SUCCESS_LOG
from protocol.errors import JobFailed
from protocol.inbox import DEFAULT_MAX_DELIVERIES, DELIVERY, GIVEN_UP
from protocol.serving import PerProcess, Role, Signed
from workers.inbox import given_up_reason, screened

log = logging.getLogger(__name__)
DEFER_PAUSE = 0.2  # seconds a deferred message waits before it goes back on the queue


def serve_tasks(app: Celery, tasks: Iterable[str], build: Callable[[], Role],
                max_deliveries: int = DEFAULT_MAX_DELIVERIES) -> None:
    tasks = tuple(tasks)
    screened(app, tasks, max_deliveries)
    role = PerProcess(build)
    worker_process_init.connect(role.after_fork, weak=False)
    trace.LOG_SUCCESS = QUIET_SUCCESS_LOG  # read at each log call: the pool processes forked later inherit it

    for name in tasks:
        @app.task(name=name, bind=True)
        def run(self: Any, payload: Any = None) -> Signed:
            if getattr(self.request, GIVEN_UP, False):  # the screen marked it: answer, do not run it again
                deliveries = int(getattr(self.request, DELIVERY)) - 1
                failure = JobFailed(f"this job was {given_up_reason(deliveries)}; its owner's log says why. Make "
                                    "it smaller or ask the owner", job_id=self.request.id)
                return role().server.refuse(payload, self.request.id, failure).signed
            answer = role().serve(self.name, payload, self.request.id)
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
