"""The node's Celery shell: task names registered on an app, each answered by one role per
pool process (the job runner, or the MPC worker); a parked job's task stays
``PENDING_APPROVAL`` until the owner decides."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from celery import Celery
from celery.app import trace
from celery.exceptions import Ignore
from celery.signals import worker_process_init

from protocol.contract import PENDING_APPROVAL, QUIET_SUCCESS_LOG
from protocol.serving import PerProcess, Role, Signed


def serve_tasks(app: Celery, tasks: Iterable[str], build: Callable[[], Role]) -> None:
    role = PerProcess(build)
    worker_process_init.connect(role.after_fork, weak=False)
    trace.LOG_SUCCESS = QUIET_SUCCESS_LOG  # read at each log call: the pool processes forked later inherit it

    for name in tasks:
        @app.task(name=name, bind=True)
        def run(self: Any, payload: Any = None) -> Signed:
            answer = role().serve(self.name, payload, self.request.id)
            if answer.parked:  # the decision is stored under this task's id when the owner makes it
                self.update_state(state=PENDING_APPROVAL, meta=answer.signed)
                raise Ignore()
            return answer.signed
