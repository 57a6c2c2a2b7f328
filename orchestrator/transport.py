"""The client's one way to the grid: signed messages out, verified replies in, sealed bytes
by claim-check. The only client module that touches Redis or Celery — the exceptions of
redis-py, kombu and Celery's Redis backend are mapped here, once, to :class:`GridError`s
that name the fix (as httpx maps httpcore's), so none reaches a data scientist.

    transport = Transport.connect(url, identity)
    transport.send("hospital", Tasks.RUN_JOB, node_queue("hospital"), job, job_id)
    state, raw = transport.result(job_id, timeout=60) or ("PENDING", None)
    env = transport.verify(raw, "hospital", job_id)
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from celery import Celery, group, states
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from kombu.exceptions import KombuError, OperationalError
from pydantic import BaseModel
from redis.sentinel import Sentinel

from orchestrator.app import RETRY_ON, make_celery
from orchestrator.known_gateways import KnownGateways
from protocol.broker import (
    error_text,
    failure_hint,
    parse_broker,
    replicated_write,
    sentinel_arguments,
    unconfirmed,
)
from protocol.cancel import CANCEL_TTL_SECONDS
from protocol.contract import (
    ALIVE_TTL_SECONDS,
    CLAIM_CHECK_PREFIX,
    CLAIM_CHECK_TTL_SECONDS,
    GATEWAY,
    GATEWAY_IDENTITY_KEY,
    GATEWAY_QUEUE,
    INTERACTIVE_RESULT_RETRY,
    MPC_MODELS_KEY,
    PENDING_APPROVAL,
    PUBLIC,
    Tasks,
    alive_key,
    cancel_key,
    sent_key,
)
from protocol.envelope import Envelope, MemoryNonceStore, open_envelope, seal_envelope
from protocol.errors import BrokerUnavailable, NodeUnavailable, NotFound, error_from_wire
from protocol.identity import Identity, PublicIdentity
from protocol.messages import GatewayReply, NodeInfo
from protocol.pinning import GatewayPins, broker_address, posted_gateway_key, shown, trust_on_first_use
from protocol.serving import parse

# what the drivers raise → what the user gets
DRIVER_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, KombuError, OperationalError)


@contextmanager
def broker_errors(url: str) -> Iterator[None]:
    """Driver errors inside become :class:`BrokerUnavailable`. Celery's result backend wraps
    one in a RuntimeError once its reconnection retries run out (``reconnect_on_error``):
    that is a broker failure too, known by its cause."""
    try:
        yield
    except DRIVER_ERRORS as exc:
        raise _unavailable(url, exc) from None
    except RuntimeError as exc:
        if not isinstance(exc.__cause__, DRIVER_ERRORS):
            raise
        raise _unavailable(url, exc.__cause__) from None


def _unavailable(url: str, exc: BaseException) -> BrokerUnavailable:
    hint = failure_hint(url, exc) or "Is Redis running there?"
    return BrokerUnavailable(f"the broker at {shown(url)} failed: {type(exc).__name__}: {error_text(exc)}. {hint} "
                             "`gridq up` starts a grid and prints its URL; `gridq status` checks one.")


def redis_client(url: str, **kwargs: Any) -> redis.Redis:
    """A redis-py client of the broker at ``url``, any form ``protocol.broker`` reads:
    redis://, rediss:// (its ssl_* options in the query) and unix:// by redis-py's own
    ``from_url``; sentinel:// and sentinels:// through redis-py's Sentinel, which asks the
    sentinels where the primary is at each new connection. ``kwargs``: more connection
    options (timeouts, say). Nothing connects before the first command."""
    broker = parse_broker(url)
    if broker.master is None:
        return redis.Redis.from_url(url, **kwargs)
    connect = sentinel_arguments(broker, **kwargs)
    return Sentinel(connect.sentinels, sentinel_kwargs=connect.sentinel_kwargs,
                    **connect.connection_kwargs).master_for(connect.master)


def posted_key(url: str) -> str:
    """The public key the gateway posted on the broker at ``url`` (as it is now: not trusted)."""
    with broker_errors(url), redis_client(url) as client:
        posted = client.get(GATEWAY_IDENTITY_KEY)
    if posted is None:
        raise NodeUnavailable(f"no gateway has started on {shown(url)}: run `gridq gateway start` "
                              "(or `gridq up`) first")
    return posted_gateway_key(posted, broker_address(url))


def pinned_key(url: str, pins: GatewayPins | None = None) -> str:
    """The gateway key to trust on ``url``'s broker: the posted one, pinned on first contact
    in ``pins`` (``$GRIDQ_HOME/known_gateways``); GatewayKeyChanged if it has changed since."""
    address = broker_address(url)  # a URL that is not one fails here, before the broker is asked
    return trust_on_first_use(pins if pins is not None else KnownGateways(), address, posted_key(url),
                              accept=f"`gridq trust-gateway {shown(url)}`")


def poll_results(app: Celery, job_ids: Sequence[str], timeout: float, also: tuple[str, ...] = ()
                 ) -> dict[str, tuple[float, dict[str, Any]]]:
    """Poll the result backend for ``job_ids`` — one MGET for all of them every 5 ms — until
    each has succeeded (or is in one of ``also``) or ``timeout`` has passed: for each that
    got there, the seconds it took and its result's meta (status, result). Another final
    state is not an answer (see :meth:`Transport.result`). (The benchmark's bare-Celery
    rounds poll with it too, so both sides wait alike.)"""
    backend = app.backend
    keys = {job_id: backend.get_key_for_task(job_id) for job_id in job_ids}
    started = time.monotonic()
    answered: dict[str, tuple[float, dict[str, Any]]] = {}
    while len(answered) < len(keys) and time.monotonic() - started < timeout:
        waiting = [j for j in keys if j not in answered]
        for job_id, raw in zip(waiting, backend.client.mget([keys[j] for j in waiting]), strict=True):
            meta = backend.decode_result(raw) if raw is not None else None
            if meta is not None and meta["status"] in (states.SUCCESS, *also):
                answered[job_id] = (time.monotonic() - started, meta)
        time.sleep(0.005)
    return answered


@dataclass(frozen=True)
class Pending:
    """A request sent to a node's worker, whose answer is read later (:meth:`Transport.answer`)."""

    node: str
    job_id: str


class Transport:
    """One identity's connection to a grid's broker."""

    def __init__(self, url: str, identity: Identity, gateway_key: PublicIdentity, timeout: float = 60.0) -> None:
        self.url = url
        self.identity = identity
        self.timeout = timeout
        self.app = make_celery(url)  # public for operator tools (Flower-like views) and tests
        self.app.conf.result_backend_transport_options = {**self.app.conf.result_backend_transport_options,
                                                          "retry_policy": INTERACTIVE_RESULT_RETRY}
        self._redis = redis_client(url)
        self._gateway = gateway_key
        self._nonces = MemoryNonceStore()
        self._node_keys: dict[str, PublicIdentity] = {}

    @classmethod
    def connect(cls, url: str, identity: Identity, *, gateway_key: str | None = None,
                timeout: float = 60.0) -> Transport:
        """Connect as ``identity``. The gateway's key is ``gateway_key`` if given, else the one
        the gateway posted on the broker, pinned on first contact (:func:`pinned_key`)."""
        if gateway_key is None:
            gateway_key = pinned_key(url)
        else:  # a dead broker is said now, as when the key is read from it, not at the first call
            with broker_errors(url), redis_client(url) as client:
                client.ping()
        return cls(url, identity, PublicIdentity.parse(GATEWAY, gateway_key), timeout)

    def close(self) -> None:
        self._redis.close()
        self.app.close()

    # --- messages out ---------------------------------------------------------------------

    def _envelope(self, node: str, body: Any, job_id: str, ttl: float | None) -> dict[str, Any]:
        options = {} if ttl is None else {"ttl": ttl}
        return seal_envelope(self.identity, recipient=node, kind=body.kind, job_id=job_id,
                             body=body.model_dump(mode="json"), now=time.time(), **options).model_dump(mode="json")

    def send(self, node: str, task: str, queue: str, body: Any, job_id: str) -> None:
        """Sign ``body`` for ``node`` and send it as ``task`` on ``queue``, with id ``job_id``;
        NodeUnavailable at once if no worker serves ``queue`` (the job would only wait)."""
        self.require_worker(node, queue)
        envelope = self._envelope(node, body, job_id, None)
        with broker_errors(self.url):
            self.mark_sent([job_id])
            self.app.send_task(task, args=[envelope], queue=queue, task_id=job_id)

    def send_all(self, messages: Sequence[tuple[str, str, str, Any, str]], *, ttl: float, label: str) -> None:
        """Several (node, task, queue, body, job id) at once, as one Celery group. ``label`` is
        what Flower shows as their arguments (an envelope's repr is tens of KB of sealed bytes)."""
        for node, queue in {(m[0], m[2]) for m in messages}:
            self.require_worker(node, queue)
        signatures = [self.app.signature(task, args=[self._envelope(node, body, job_id, ttl)], queue=queue)
                      .set(task_id=job_id, argsrepr=label) for node, task, queue, body, job_id in messages]
        with broker_errors(self.url):
            self.mark_sent([m[4] for m in messages])
            group(signatures).apply_async()

    def mark_sent(self, job_ids: Sequence[str]) -> None:
        """Record ``job_ids`` as sent (``Grid.ticket`` finds them): done by :meth:`send`; a
        tool that sends messages of its own calls it."""
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.setex(sent_key(job_id), int(self.app.conf.result_expires or 86400), 1)
            pipe.execute()

    def cancel(self, job_id: str, mark: bytes) -> bytes | None:
        """Put a signed cancellation under the job's cancel key unless its node (or anything
        else) got there first (``SET NX``, :mod:`protocol.cancel`): None if it was put — the
        node will not run the job — else what is there."""
        key = cancel_key(job_id)
        with broker_errors(self.url):
            if self._redis.set(key, mark, nx=True, ex=CANCEL_TTL_SECONDS):
                return None
            there = self._redis.get(key) or b""  # b"": it expired in between (nothing to cancel any more)
        return there.encode() if isinstance(there, str) else there

    def cancel_mark(self, job_id: str) -> bytes | None:
        """What the job's cancel key holds: the node's ``started``, a cancellation, or None."""
        with broker_errors(self.url):
            mark = self._redis.get(cancel_key(job_id))
        return mark.encode() if isinstance(mark, str) else mark

    def sent(self, job_id: str) -> bool:
        """Whether a job of this id was sent on this broker (its result may still be read)."""
        with broker_errors(self.url):
            return bool(self._redis.exists(sent_key(job_id))) or self.state(job_id) != states.PENDING

    def require_worker(self, node: str, queue: str) -> None:
        """NodeUnavailable unless a worker of ``queue`` said it is up within the last
        ``ALIVE_TTL_SECONDS`` (``workers.beacon``). Asked for every job (one EXISTS): a yes
        remembered even for a second would send jobs to a node that has just stopped."""
        with broker_errors(self.url):
            up = bool(self._redis.exists(alive_key(queue)))
        if not up:
            raise NodeUnavailable(f"no worker of {node!r} serves {queue} (none said so in the last "
                                  f"{ALIVE_TTL_SECONDS:.0f} s): the job would only wait in its queue. Its owner starts "
                                  f"it with `gridq {'mpc' if queue.startswith('mpc.') else 'node'} start`; "
                                  "`gridq status` shows which are up")

    def ask(self, node: str, task: str, queue: str, body: Any) -> Pending:
        """Send a signed request whose answer :meth:`answer` reads (ask several, then read)."""
        job_id = uuid.uuid4().hex
        self.send(node, task, queue, body, job_id)
        return Pending(node, job_id)

    def push(self, node: str, queue: str, key: str, body: Any) -> Pending:
        """Like :meth:`ask`, but the signed request is pushed on the list ``key``, which the
        workers of ``queue`` pop beside their Celery tasks (the MPC hot path:
        ``workers.mpc.lists``); its answer is stored as a task's, read by :meth:`answer`."""
        self.require_worker(node, queue)
        job_id = uuid.uuid4().hex
        envelope = self._envelope(node, body, job_id, None)
        with broker_errors(self.url):
            self._redis.rpush(key, json.dumps(envelope))
        return Pending(node, job_id)

    def answer(self, pending: Pending, what: str, *, key: PublicIdentity | None = None,
               recipient: str | None = None) -> Envelope:
        """The verified reply to ``pending`` (see :meth:`verify`); ``NodeUnavailable`` naming
        ``what`` should run there if none comes within the timeout."""
        found = self.result(pending.job_id, self.timeout)
        if found is None:
            raise NodeUnavailable(f"{pending.node!r} did not answer in {self.timeout:.0f} s; is its {what} running?"
                                  + self.unsigned(pending.job_id))
        return self.verify(found[1], pending.node, pending.job_id, key=key, recipient=recipient)

    def ask_gateway(self, task: str, *args: Any) -> GatewayReply:
        """The gateway's signed answer (a search, the node list); its typed error if it refused."""
        job_id = uuid.uuid4().hex
        with broker_errors(self.url):
            self.app.send_task(task, args=list(args), queue=GATEWAY_QUEUE, task_id=job_id)
        # the gateway signs its answers to anyone, for the question asked (the job id)
        env = self.answer(Pending(GATEWAY, job_id), "`gridq gateway start`", key=self._gateway, recipient=PUBLIC)
        body = replied(env, GatewayReply)
        for info in body.nodes:
            self._node_keys[info.node] = PublicIdentity.parse(info.node, info.public_key)
        return body

    # --- replies in -----------------------------------------------------------------------

    def node_key(self, node: str) -> PublicIdentity:
        """A node's key as the gateway lists it; NotFound at once for a node it does not know."""
        if node not in self._node_keys:
            self.nodes()
        if node not in self._node_keys:
            raise NotFound(f"node {node!r} is not registered at the gateway; registered: "
                           f"{', '.join(sorted(self._node_keys)) or 'none'} (`gridq status` lists them)")
        return self._node_keys[node]

    def nodes(self) -> list[NodeInfo]:
        return list(self.ask_gateway(Tasks.NODES).nodes)

    def verify(self, raw: Any, node: str, job_id: str, *, key: PublicIdentity | None = None,
               recipient: str | None = None) -> Envelope:
        """``node``'s signed reply to ``job_id``, verified (sender, recipient, nonce, expiry),
        and signed for that job: whoever can write the result backend could otherwise put
        the node's genuine answer to another job under this one's key. ``key``: the sender's
        (default: the node's, as the gateway lists it); ``recipient``: who it must be signed to
        (default: this identity)."""
        key = key or self.node_key(node)
        if recipient is None:  # a refusal of a message that named no sender is addressed to anyone; it carries no value
            recipient = PUBLIC if isinstance(raw, dict) and raw.get("recipient") == PUBLIC else self.identity.name
        return open_envelope(raw, recipient=recipient, keyring={node: key}, nonces=self._nonces,
                             delivery_id=job_id, now=time.time(), job_id=job_id)

    def state(self, job_id: str) -> str:
        """Celery's state of a job (PENDING, STARTED, a final one, or gridq's pending_approval)."""
        with broker_errors(self.url):
            return str(AsyncResult(job_id, app=self.app).state)

    def result(self, job_id: str, timeout: float = 0.0) -> tuple[str, Any] | None:
        """A job's answer — its state SUCCESS and the signed reply stored with it — waiting up
        to ``timeout`` seconds for it (woken by the backend's pub/sub: no polling delay); None
        if there is none by then. Any other final state (FAILURE, REVOKED) is not an answer:
        nothing signed it, and whoever can write the backend can write one. Waiting on gives a
        node whose worker died the time to run the job again (it is redelivered) and answer."""
        deadline = time.monotonic() + timeout
        with broker_errors(self.url):
            while True:
                async_result = AsyncResult(job_id, app=self.app)
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    try:
                        async_result.get(timeout=remaining, propagate=False, interval=0.05)
                    except CeleryTimeout:
                        # stop listening for it now, while the broker is there (not whenever it is collected)
                        self.app.backend.remove_pending_result(async_result)
                        return None
                    except BaseException:
                        self._forget(async_result)
                        raise
                if async_result.state == states.SUCCESS:
                    return async_result.state, async_result.result
                if deadline - time.monotonic() <= 0:
                    return None
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))  # an unsigned final state: wait on

    def _forget(self, async_result: AsyncResult) -> None:
        """Stop waiting for a result whose wait failed (the broker went away): now, and quietly,
        rather than from its ``__del__``, where a failure would only be printed."""
        with suppress(RuntimeError, *DRIVER_ERRORS):
            self.app.backend.remove_pending_result(async_result)

    def parked(self, job_id: str) -> Any | None:
        """What the node stored with a job it parked for its owner (its signed answer saying
        so), or None if the job's state is not ``pending_approval``."""
        with broker_errors(self.url):
            async_result = AsyncResult(job_id, app=self.app)
            return async_result.result if async_result.state == PENDING_APPROVAL else None

    def unsigned(self, job_id: str) -> str:
        """What the backend holds for a job that has no signed answer, as a hint ('' if nothing)."""
        state = self.state(job_id)
        if state not in (states.FAILURE, states.REVOKED):
            return ""
        return (f" The result backend says {state}, unsigned, which proves nothing: the worker may have died (its "
                "owner's log says why) or something with access to the broker wrote it.")

    def results(self, job_ids: Sequence[str], timeout: float, also: tuple[str, ...] = ()
                ) -> dict[str, tuple[float, dict[str, Any]]]:
        """Several jobs' results at once (:func:`poll_results`)."""
        with broker_errors(self.url):
            return poll_results(self.app, job_ids, timeout, also)

    # --- bytes by claim-check, and what nodes post -----------------------------------------

    def leave(self, data: bytes) -> str:
        """Leave sealed bytes in Redis by claim-check, for the one they are sealed to; the key."""
        key = f"{CLAIM_CHECK_PREFIX}{uuid.uuid4().hex}"
        broker = parse_broker(self.url)
        with broker_errors(self.url):
            if not broker.wait_replicas:
                self._redis.setex(key, CLAIM_CHECK_TTL_SECONDS, data)  # a blob always has a TTL (ops/acl.py)
                return key

            def write(wait_ms: int) -> int:  # on a replicated broker, as a job: once a replica holds it
                with self._redis.pipeline(transaction=False) as pipe:
                    pipe.setex(key, CLAIM_CHECK_TTL_SECONDS, data)
                    pipe.execute_command("WAIT", broker.wait_replicas, wait_ms)
                    return int(pipe.execute()[-1])

            done = replicated_write(write, lambda: self._redis.connection_pool.disconnect(inuse_connections=False),
                                    broker.wait_replicas, broker.wait_timeout, retry_on=RETRY_ON)
        if done.error is not None:
            raise _unavailable(self.url, done.error)
        if done.replicas < broker.wait_replicas:
            raise BrokerUnavailable(unconfirmed("a sealed value left for a job", shown(self.url), done,
                                                broker.wait_replicas, broker.wait_timeout))
        return key

    def claim(self, key: str) -> bytes:
        """Fetch (and delete) sealed bytes left by claim-check."""
        with broker_errors(self.url):
            data = self._redis.getdel(key)
        if data is None:
            raise NotFound(f"the released value {key!r} has expired from the broker; run the job again")
        return data.encode() if isinstance(data, str) else data

    def posted_models(self) -> list[bytes | str]:
        """The model cards MPC hosts posted (each signed by its host: the caller verifies)."""
        with broker_errors(self.url):
            return list(self._redis.hgetall(MPC_MODELS_KEY).values())

    # --- the operator's view ----------------------------------------------------------------

    def ping(self, timeout: float = 1.0, destination: list[str] | None = None) -> list[str]:
        """The hostnames of the workers that answer a ping (of those of ``destination`` only,
        if given: then it returns as soon as all of them have answered)."""
        with broker_errors(self.url):
            replies = self.app.control.ping(destination=destination, timeout=timeout)
            return [name for reply in replies for name in reply]

    def served_queues(self, timeout: float = 1.0) -> set[str]:
        """Every queue a live worker consumes."""
        with broker_errors(self.url):
            served = self.app.control.inspect(timeout=timeout).active_queues() or {}
        return {q["name"] for queues in served.values() for q in queues}

    def queue_length(self, queue: str) -> int:
        with broker_errors(self.url):
            return int(self._redis.llen(queue))


R = TypeVar("R", bound=BaseModel)


def replied(env: Envelope, body: type[R]) -> R:
    """A verified reply's body as ``body``, or the typed error it carries, raised: the last
    step of every request the client waits for (the gateway's, an MPC worker's; a job's
    ticket keeps the reply it raises from)."""
    reply = parse(body, env.body_json())
    error = getattr(reply, "error", None)
    if error is not None:
        raise error_from_wire(error.model_dump())
    return reply
