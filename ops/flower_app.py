"""The Celery app Flower runs with: gridq's settings (msgpack/JSON, never pickle), on the
broker named by ``GRIDQ_BROKER``. A bare ``celery flower`` would accept JSON only and fail
to read the workers' msgpack replies.

Also what ``gridq flower`` checks before it starts Flower: Flower off this machine's
loopback needs HTTP basic auth (its UI and API can revoke jobs and shut workers down), given
as a file of one line ``user:password`` (``--auth-file``, mode 0600: docker compose's
``init`` writes ``/var/lib/gridq/flower.auth``) or as ``FLOWER_BASIC_AUTH``.

And how Flower is set up, on import (before Flower reads its options):

* ``/metrics`` and ``/healthcheck`` ask for the same password as the rest (Flower 2 serves
  them to anyone: the task counts by name and worker, the workers' names).
* A task's result is how its job ended — ``answered``, ``refused: budget_exhausted``,
  ``failed: job_failed``… — from the worker's ``task-outcome`` event (``workers.tasks``),
  and the task list has a Result column. A refused job is a Celery ``SUCCESS`` like a served
  one (the client reads the refusal from the signed reply); this is how an operator tells
  them apart. No reply is shown: Celery's own events carry none (``resultrepr_maxsize=0``).
  ``FLOWER_TASKS_COLUMNS`` (or ``--tasks_columns``) still picks other columns."""

from __future__ import annotations

import atexit
import ipaddress
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from celery.events.state import Task as EventTask
from flower.options import options as flower_options
from flower.views import monitor
from tornado import web

from orchestrator.app import make_celery
from protocol.errors import InvalidRequest, NotFound
from workers.tasks import OUTCOME_EVENT, OUTCOME_FIELD, OUTCOMES

app = make_celery(os.environ.get("GRIDQ_BROKER", "redis://127.0.0.1:6379/0"), name="gridq-flower")

# what Celery's event state calls a task whose last event was its outcome (a custom task-* event)
OUTCOME_STATE = OUTCOME_EVENT.removeprefix("task-").upper()
TASKS_COLUMNS = "name,uuid,state,result,received,runtime,worker"  # Flower's default, and the Result column

_CREDENTIAL = re.compile(r"[^\s:,]+:[^\s,]+")  # Flower splits FLOWER_BASIC_AUTH on commas


def basic_auth(auth_file: Path | None) -> str:
    """The ``user:password`` Flower is to ask for: from ``auth_file``, else from
    ``$FLOWER_BASIC_AUTH`` (several, comma-separated), else ``""`` (none)."""
    if auth_file is None:
        given = os.environ.get("FLOWER_BASIC_AUTH", "").strip()
        if given and not all(_CREDENTIAL.fullmatch(c) for c in given.split(",")):
            raise InvalidRequest("FLOWER_BASIC_AUTH must be user:password (or several, comma-separated), "
                                 "without spaces")
        return given
    path = auth_file.expanduser()
    try:
        mode = path.stat().st_mode & 0o777
        text = path.read_text()
    except FileNotFoundError:
        raise NotFound(f"no Flower auth file at {path}: write one line 'user:password' to it (mode 0600); in "
                       "docker compose the init service writes /var/lib/gridq/flower.auth") from None
    except OSError as exc:
        raise InvalidRequest(f"cannot read the Flower auth file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise InvalidRequest(f"the Flower auth file {path} is readable by others (mode {mode:04o}): "
                             f"chmod 600 {path}")
    credential = text.strip()
    if not _CREDENTIAL.fullmatch(credential):
        raise InvalidRequest(f"the Flower auth file {path} must hold one line 'user:password' (no spaces or "
                             "commas)")
    return credential


def run(argv: list[str]) -> NoReturn:
    """Run Flower (``celery`` with ``argv``) and end the process as soon as Flower stops.

    Flower stops its loop on SIGTERM (or Ctrl-C), but Python then joins its thread pool
    before exiting, and with the broker gone a thread in it is retrying a broadcast
    (``enable_events``, every 5 s) under kombu's retry policy — for many minutes: the process
    never ended. So once Flower is done, the exit handlers run (Flower's own stop, logging's
    flush) and the process ends without waiting for threads that only talk to the broker."""
    from celery.bin.celery import main as celery_main

    sys.argv = argv
    code = 0
    try:
        celery_main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_loopback(address: str) -> bool:
    """Whether Flower bound to ``address`` is reachable from this machine only ("" binds
    every interface)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def format_task(task: Any) -> Any:
    """Flower's ``format_task`` (applied to a copy of each task it shows, in its list and on
    its page): the result is the outcome the worker announced, if it is one of the words
    ``workers.tasks.outcome`` says (anything else, a forged event's, is not shown). The
    event is sent once the reply is stored, so a task whose last event was it is a
    ``SUCCESS`` (Celery's ``task-succeeded`` comes a moment later, from the worker's parent)."""
    said = getattr(task, OUTCOME_FIELD, None)
    if isinstance(said, str) and OUTCOMES.fullmatch(said):
        task.result = said
        if task.state == OUTCOME_STATE:
            task.state = "SUCCESS"
    setattr(task, OUTCOME_FIELD, None)  # shown as the result; not twice on the task's page
    return task


def _behind_auth(handler: type[web.RequestHandler]) -> None:
    """Make ``handler``'s GET ask for what Flower's pages ask for (``tornado.web.authenticated``
    over Flower's ``get_current_user``: basic auth, OAuth; nothing when Flower has none)."""
    if not getattr(handler.get, "gridq_authenticated", False):
        guarded = web.authenticated(handler.get)
        guarded.gridq_authenticated = True  # type: ignore[attr-defined]
        handler.get = guarded  # type: ignore[method-assign]


def _set_up_flower() -> None:
    for handler in (monitor.Metrics, monitor.Healthcheck):
        _behind_auth(handler)
    # Celery's event state keeps a custom event's fields on the task, but Flower copies a task
    # (to format it, to list it) by its declared fields only: the outcome is declared one
    if OUTCOME_FIELD not in EventTask._fields:
        EventTask._fields = (*EventTask._fields, OUTCOME_FIELD)
        setattr(EventTask, OUTCOME_FIELD, None)
    flower_options.format_task = format_task
    flower_options.tasks_columns = TASKS_COLUMNS  # FLOWER_TASKS_COLUMNS, --tasks_columns: applied after this


_set_up_flower()
