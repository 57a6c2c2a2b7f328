"""Serving signed messages: the one path every worker of the grid answers by.

A node's jobs, its MPC roles and the gateway all do the same thing with a message:
open it (verify sender, signature, recipient, expiry, nonce) → parse its body by its kind →
run the route for that kind → answer with a reply envelope signed by this side. One error
policy covers all of them:

* a message that cannot be verified is refused, to whoever it claims to be from (a refusal
  carries no secret), and nothing is recorded for it;
* a :class:`GridError` is answered as itself; the worker's time limit as ``JobFailed``;
* anything else (a bug, a resource problem) is logged with its traceback *here* and answered
  as ``JobFailed`` pointing to that log — the requester hears at once instead of waiting
  for a timeout, and the worker goes on serving.

The Celery shell (``workers.tasks.answer_tasks``, for the node, MPC and gateway workers)
registers a role's task names and keeps one role per pool process (:class:`PerProcess`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from protocol.contract import PUBLIC, RESULT_TTL_SECONDS
from protocol.envelope import Envelope, NonceStore, open_envelope, seal_envelope
from protocol.errors import GridError, InvalidRequest, JobFailed
from protocol.identity import Identity, PublicIdentity
from protocol.messages import first_problem
from protocol.spans import span

log = logging.getLogger(__name__)
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
T = TypeVar("T")
B = TypeVar("B", bound=BaseModel)
Signed = dict[str, Any]  # a reply envelope, as it goes on the wire


@dataclass(frozen=True)
class Answer:
    """What a worker sends back: the signed reply, and whether the job now waits for its
    owner (the Celery task then reads ``PENDING_APPROVAL`` until the owner decides) — or
    no reply yet: the message is deferred, put back behind the others (``workers.jobs.slots``)."""

    signed: Signed
    parked: bool = False
    deferred: bool = False


DEFERRED = Answer({}, deferred=True)


@dataclass(frozen=True)
class Route:
    """How one kind of message is served: the body type it is parsed as, and the handler
    that turns the verified envelope and its body into a reply."""

    body: type[BaseModel]
    run: Callable[[Envelope, Any], Any]


def parse(model: type[B], data: object, job_id: str | None = None) -> B:
    """A verified envelope's body as ``model``, or InvalidRequest saying what is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(f"malformed {model.__name__} message: {first_problem(exc, 'body')}",
                             job_id=job_id) from None


def claimed(raw: Any) -> tuple[str, str | None]:
    """Whom to refuse an unverified message to (the sender it names, if that is a name at
    all, else ``public``), and the job id it names (trimmed: it is unverified)."""
    sender = raw.get("sender") if isinstance(raw, dict) else None
    job_id = str(raw.get("job_id") or "")[:80] if isinstance(raw, dict) else ""
    return (sender if isinstance(sender, str) and _NAME.fullmatch(sender) else PUBLIC), job_id or None


class EnvelopeServer:
    """Open → dispatch → sign, for one identity, with the grid's one error policy.

    ``failure`` builds the role's reply type carrying an error (each reply type has one);
    ``passthrough`` are exceptions that are control flow for the caller (a job parked for
    approval), ``time_limits`` the worker's own time-limit exceptions; ``reply_ttl`` how long
    a signed reply stays valid (as long as the result backend keeps it: RESULT_TTL_SECONDS)."""

    def __init__(self, identity: Identity, nonces: NonceStore, failure: Callable[[GridError, str], BaseModel], *,
                 passthrough: tuple[type[BaseException], ...] = (),
                 time_limits: tuple[type[BaseException], ...] = (),
                 reply_ttl: float = RESULT_TTL_SECONDS) -> None:
        self.identity = identity
        self.nonces = nonces
        self.failure = failure
        self.passthrough = passthrough
        self.time_limits = time_limits
        self.reply_ttl = reply_ttl

    def open_and_answer(self, raw: Any, delivery_id: str, keyring: Mapping[str, PublicIdentity],
              answer: Callable[[Envelope], Answer]) -> Answer:
        """Verify ``raw`` against ``keyring`` and answer it; what cannot be verified is refused."""
        try:
            with span("open the signed request"):
                env = open_envelope(raw, recipient=self.identity.name, keyring=keyring, nonces=self.nonces,
                                    delivery_id=delivery_id, now=time.time())
        except GridError as exc:
            return self.refuse(raw, delivery_id, exc)
        return answer(env)

    def refuse(self, raw: Any, delivery_id: str, exc: GridError) -> Answer:
        """``exc`` as the answer to an unverified message, to the sender it claims (a refusal
        carries no secret); signed for the delivery it answers (where it is stored), whatever
        job the message claimed."""
        to, job_id = claimed(raw)
        log.warning("%s refused message %s from %r: %s", self.identity.name, job_id or delivery_id, to, exc)
        return Answer(self.sign(to, delivery_id, self.failure(exc, delivery_id)))

    def reply(self, env: Envelope, routes: Mapping[str, Route]) -> Answer:
        """The common answer: run the message's route, sign its reply to the sender."""
        body = self.guarded(lambda: self.route(env, routes), env.job_id)
        with span("sign the reply"):
            return Answer(self.sign(env.sender, env.job_id, body))

    def route(self, env: Envelope, routes: Mapping[str, Route]) -> Any:
        """Run the route for the envelope's kind on its parsed body (no error policy: see guarded)."""
        route = routes.get(env.kind)
        if route is None:
            raise InvalidRequest(f"{self.identity.name!r} does not take {env.kind!r} messages here; "
                                 f"it takes {', '.join(sorted(routes))}", job_id=env.job_id)
        return route.run(env, parse(route.body, env.body_json(), env.job_id))

    def guarded(self, work: Callable[[], T], job_id: str,
                failure: Callable[[GridError, str], T] | None = None) -> T:
        """``work()``, or the failure reply the error policy gives for what it raised."""
        fail: Callable[[GridError, str], Any] = failure or self.failure
        try:
            return work()
        except self.passthrough:
            raise
        except GridError as exc:
            log.warning("%s: %s refused: %s", self.identity.name, job_id, exc)
            return fail(exc, job_id)  # type: ignore[no-any-return]
        except self.time_limits:
            return fail(JobFailed("the work ran past this worker's time limit; split it into smaller pieces",  # type: ignore[no-any-return]
                                  job_id=job_id), job_id)
        except Exception as exc:  # a bug or a resource problem: the log has the details, the requester hears now
            return fail(unexpected(exc, self.identity.name, job_id), job_id)  # type: ignore[no-any-return]

    def sign(self, to: str, job_id: str, reply: BaseModel, ttl: float | None = None) -> Signed:
        """``reply`` signed to ``to``, valid for ``ttl`` seconds (default: ``reply_ttl``)."""
        env = seal_envelope(self.identity, recipient=to, kind=reply.kind, job_id=job_id,  # type: ignore[attr-defined]
                            body=reply.model_dump(mode="json"), now=time.time(),
                            ttl=self.reply_ttl if ttl is None else ttl)
        return env.model_dump(mode="json")


def unexpected(exc: BaseException, where: str, job_id: str) -> JobFailed:
    """Log an exception the grid has no type for, and the JobFailed its requester reads."""
    log.error("%s: %s failed", where, job_id, exc_info=exc)
    return JobFailed(f"the work failed at {where!r} ({type(exc).__name__}); its owner's log has details",
                     job_id=job_id)


class Role(Protocol):
    """A worker's logic, free of Celery: answers each task's payload, by its server."""

    server: EnvelopeServer

    def answer(self, task: str, payload: Any, delivery_id: str) -> Answer: ...


R = TypeVar("R", bound=Role)


class PerProcess(Generic[R]):
    """The role of this worker process, built once per pool process right after the fork
    (each side connects :meth:`after_fork` to Celery's ``worker_process_init``), so no
    database or broker connection is shared across processes; where no fork happens (a
    solo pool, a task applied in-process) it is built at first use."""

    def __init__(self, build: Callable[[], R]) -> None:
        self._build = build
        self._role: R | None = None

    def after_fork(self, **_: Any) -> None:
        self._role = self._build()  # never the parent's: its connections are not this process's

    def __call__(self) -> R:
        if self._role is None:
            self._role = self._build()
        return self._role
