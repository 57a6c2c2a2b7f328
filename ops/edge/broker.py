"""The edge's side of the broker, asynchronous: it admits a verified envelope (a worker
serves its queue; its nonce and job id are new: ``SET NX`` with a TTL, shared by every edge
process), sends it with Celery as ``orchestrator.transport.Transport.send`` does, and
long-polls results without blocking the event loop — one pub/sub connection per process
wakes the waits (Celery's Redis backend publishes each stored state on the result key's
channel), with a GET now and then in case a message was missed.

It holds no participant's key and opens nothing: replies are relayed as their nodes signed
(and sealed) them.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from typing import Any
from uuid import uuid4

import redis.asyncio as aioredis
from celery import states
from kombu.utils.json import loads as celery_json
from redis.asyncio.sentinel import Sentinel

from ops.edge.checks import TooMany, nonce_ttl
from orchestrator.app import make_celery
from protocol.broker import parse_broker, sentinel_arguments
from protocol.cancel import CANCEL_TTL_SECONDS, STARTED
from protocol.contract import (
    ALIVE_TTL_SECONDS,
    CLAIM_CHECK_PREFIX,
    CLAIM_CHECK_TTL_SECONDS,
    GATEWAY_IDENTITY_KEY,
    GATEWAY_NODES_KEY,
    GATEWAY_QUEUE,
    MPC_MODELS_KEY,
    PENDING_APPROVAL,
    Tasks,
    alive_key,
    cancel_key,
    edge_nonce_key,
    sent_key,
)
from protocol.envelope import Envelope
from protocol.errors import InvalidRequest, NodeUnavailable, NotFound, ReplayedNonce
from protocol.pinning import broker_address, posted_gateway_key

log = logging.getLogger(__name__)

RESULT_PREFIX = "celery-task-meta-"  # Celery's Redis backend: a task's result key, and its channel
ANSWERS = (states.SUCCESS, PENDING_APPROVAL)  # states a node signed what it stored: a reply to relay
RECHECK_SECONDS = 1.0  # a long-poll GETs the result this often too (a missed message, a broker back)
IDLE_CHANNEL = "celery-task-meta-gridq-edge-idle"  # keeps the pub/sub connection subscribed (and ACL-allowed)


def async_client(url: str) -> aioredis.Redis:
    """redis.asyncio's client of the broker at ``url``, any form ``protocol.broker`` reads:
    redis://, rediss:// and unix:// by its own ``from_url``, sentinel:// and sentinels://
    through its Sentinel (the primary asked of the sentinels at each new connection)."""
    broker = parse_broker(url)
    if broker.master is None:
        return aioredis.Redis.from_url(url)
    connect = sentinel_arguments(broker)
    return Sentinel(connect.sentinels, sentinel_kwargs=connect.sentinel_kwargs,
                    **connect.connection_kwargs).master_for(connect.master)


class ResultWaiter:
    """Wakes long-polls: one pub/sub connection for the process; each wait subscribes to its
    result's channel (shared by waits on the same job) and gets what is published there."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._pubsub = client.pubsub()
        self._queues: dict[str, set[asyncio.Queue[bytes]]] = {}
        self._ready: dict[str, asyncio.Event] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._pubsub.subscribe(IDLE_CHANNEL)
        self._task = asyncio.create_task(self._read(), name="edge-results")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        with suppress(Exception):
            await self._pubsub.aclose()

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker went away: waits GET meanwhile; redis-py resubscribes
                log.warning("result channel: %s: %s", type(exc).__name__, exc)
                await asyncio.sleep(0.5)
                continue
            if message is None:
                continue
            channel = _text(message["channel"])
            if message["type"] == "subscribe" and channel in self._ready:
                self._ready[channel].set()
            elif message["type"] == "message":
                for queue in self._queues.get(channel, ()):
                    queue.put_nowait(message["data"])

    @asynccontextmanager
    async def watch(self, channel: str) -> AsyncIterator[asyncio.Queue[bytes]]:
        """What is published on ``channel`` from now on (subscribed once the block starts)."""
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        first = channel not in self._queues
        self._queues.setdefault(channel, set()).add(queue)
        try:
            if first:
                ready = self._ready[channel] = asyncio.Event()
                async with self._lock:
                    await self._pubsub.subscribe(channel)
            ready = self._ready.get(channel) or asyncio.Event()
            with suppress(TimeoutError):  # no confirmation: the periodic GET covers it
                await asyncio.wait_for(ready.wait(), RECHECK_SECONDS)
            yield queue
        finally:
            waiting = self._queues.get(channel, set())
            waiting.discard(queue)
            if not waiting:
                self._queues.pop(channel, None)
                self._ready.pop(channel, None)
                with suppress(Exception):
                    async with self._lock:
                        await self._pubsub.unsubscribe(channel)


class EdgeBroker:
    """The edge's connections to the grid's broker, as its own broker user (``ops/acl.py``)."""

    def __init__(self, url: str, *, max_waiters: int = 1000, send_threads: int = 4) -> None:
        self.url = url
        self.app = make_celery(url, "gridq-edge")
        # no result backend here: send_task would subscribe a (blocking) result consumer to every job's
        # channel, which nobody reads, and stored results would pile up on that connection. The workers
        # store results as ever; the edge reads them with redis.asyncio.
        self.app.conf.result_backend = "disabled"
        self.redis = async_client(url)
        self.sent_ttl = int(self.app.conf.result_expires or 86400)  # as Transport.mark_sent
        self.waiter = ResultWaiter(self.redis)
        self.max_waiters = max_waiters
        self._waiting = 0
        self._senders = ThreadPoolExecutor(send_threads, thread_name_prefix="edge-send")  # kombu blocks

    async def start(self) -> None:
        await self.waiter.start()

    async def close(self) -> None:
        await self.waiter.close()
        await self.redis.aclose()
        self._senders.shutdown(wait=False)
        self.app.close()

    # --- jobs -------------------------------------------------------------------------------

    async def admit(self, env: Envelope, queue: str, now: float) -> None:
        """A worker serves ``queue`` (else NodeUnavailable, as ``Transport.require_worker``), and
        the envelope's nonce and job id are new (else ReplayedNonce): both remembered here, for
        every edge process on this broker, until the envelope and the result expire."""
        if not await self.redis.exists(alive_key(queue)):
            raise NodeUnavailable(f"no worker of {env.recipient!r} serves {queue} (none said so in the last "
                                  f"{ALIVE_TTL_SECONDS:.0f} s): the job would only wait in its queue",
                                  job_id=env.job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(edge_nonce_key(env.sender, env.nonce), 1, nx=True, ex=nonce_ttl(env, now))
            pipe.set(sent_key(env.job_id), f"{env.sender} {queue}", nx=True, ex=self.sent_ttl)  # whose: sent_by
            fresh_nonce, fresh_job = await pipe.execute()
        if not fresh_nonce:
            raise ReplayedNonce(f"nonce {env.nonce[:8]}… of {env.sender!r} was already used", job_id=env.job_id)
        if not fresh_job:
            raise ReplayedNonce(f"job {env.job_id} was sent already: each job id is sent once", job_id=env.job_id)

    async def send(self, task: str, queue: str, envelope: dict[str, Any], job_id: str) -> None:
        """``send_task`` with the job id as task id, as the Python client does (in a thread:
        kombu's publish blocks)."""
        await asyncio.get_running_loop().run_in_executor(
            self._senders, functools.partial(self.app.send_task, task, args=[envelope], queue=queue, task_id=job_id))

    async def job(self, job_id: str, wait: float) -> tuple[str, Any, str | None]:
        """A job's state, the reply its node signed (SUCCESS, PENDING_APPROVAL) and what its
        cancel key holds (``protocol.cancel``: ``started``, a cancellation, or None), waiting up
        to ``wait`` seconds for a reply — not for one the node gives a job cancelled before it
        took it up, which may be long in coming; NotFound if the job was never sent."""
        key = f"{RESULT_PREFIX}{job_id}"
        if wait <= 0:
            meta, mark = await self._sent_meta(job_id, key)
            return (*_shown(meta), mark)
        with self._reserved():
            async with self.waiter.watch(key) as messages:
                meta, mark = await self._sent_meta(job_id, key)  # after subscribing: nothing stored since is missed
                if mark is None or mark == STARTED.decode():  # else cancelled: the node answers when it gets there
                    meta = await self._until(key, messages, meta, wait, ANSWERS)
                    if mark is None and _shown(meta)[1] is None:  # cancelled meanwhile?
                        mark = _mark(await self.redis.get(cancel_key(job_id)))
        return (*_shown(meta), mark)

    async def _sent_meta(self, job_id: str, key: str) -> tuple[dict[str, Any] | None, str | None]:
        """The job's stored state, if any, and its cancel mark; NotFound if it has no state
        and was never sent."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.exists(sent_key(job_id))
            pipe.get(cancel_key(job_id))
            raw, sent, mark = await pipe.execute()
        if raw is None and not sent:
            raise NotFound(f"no job {job_id} was sent on this grid, or it is older than its result's lifetime",
                           job_id=job_id)
        return None if raw is None else self._decode(raw), _mark(mark)

    async def sent_by(self, job_id: str) -> tuple[str, str]:
        """Who sent ``job_id`` through an edge and to which queue (``admit`` keeps both under
        the job's sent key); ("", "") for a job sent otherwise (a Python client's, a search);
        NotFound if it was never sent, or its result's lifetime is over."""
        value = await self.redis.get(sent_key(job_id))
        if value is None:
            raise NotFound(f"no job {job_id} was sent on this grid, or it is older than its result's lifetime",
                           job_id=job_id)
        sender, _, queue = _text(value).partition(" ")
        return (sender, queue) if queue else ("", "")

    async def cancel(self, job_id: str, mark: str) -> str | None:
        """Put a verified cancellation under the job's cancel key unless its node (or anything
        else) got there first (``SET NX EX``, as ``Transport.cancel``): None if it was put — the
        node will not run the job — else what is there ("" if it expired in between)."""
        if await self.redis.set(cancel_key(job_id), mark, nx=True, ex=CANCEL_TTL_SECONDS):
            return None
        return _mark(await self.redis.get(cancel_key(job_id))) or ""

    # --- the gateway --------------------------------------------------------------------------

    async def search(self, query: dict[str, Any], timeout: float, job_id: str | None = None) -> tuple[str, Any]:
        """The gateway's signed answer to ``query``, sent as ``Transport.ask_gateway`` sends it,
        with ``job_id`` as its task id: the client's (the gateway signs its reply for that id,
        so a client that chose a fresh one knows the reply answers its question), else a new
        one. An id is sent once (else ReplayedNonce): a client cannot have the gateway's reply
        stored over another job's result."""
        job_id = job_id or uuid4().hex
        key = f"{RESULT_PREFIX}{job_id}"
        with self._reserved():
            if not await self.redis.set(sent_key(job_id), 1, nx=True, ex=self.sent_ttl):
                raise ReplayedNonce(f"job {job_id} was sent already: each job id is sent once", job_id=job_id)
            async with self.waiter.watch(key) as messages:
                await asyncio.get_running_loop().run_in_executor(self._senders, functools.partial(
                    self.app.send_task, Tasks.SEARCH, args=[query], queue=GATEWAY_QUEUE, task_id=job_id))
                meta = await self._until(key, messages, None, timeout, (states.SUCCESS,))
        if meta is None or meta.get("status") != states.SUCCESS:
            raise NodeUnavailable(f"the gateway did not answer in {timeout:.0f} s; is `gridq gateway start` running?")
        return job_id, meta.get("result")

    async def gateway(self) -> dict[str, str]:
        """The gateway's key (as it posts it) and its signed node listing (the exact string)."""
        posted, listing = await self.redis.mget([GATEWAY_IDENTITY_KEY, GATEWAY_NODES_KEY])
        if posted is None or listing is None:
            raise NodeUnavailable("no gateway has posted its key and node listing on this broker (it does every "
                                  "10 s): is `gridq gateway start` running?")
        try:
            key = posted_gateway_key(posted, broker_address(self.url))
        except InvalidRequest as exc:
            raise NodeUnavailable(exc.message) from None
        return {"public_key": key, "listing": _text(listing)}

    async def models(self) -> dict[str, Any]:
        """The cards MPC hosts posted, by ``owner/name`` (signed: the client checks them)."""
        out = {}
        for name, card in (await self.redis.hgetall(MPC_MODELS_KEY)).items():
            try:
                out[_text(name)] = json.loads(card)
            except ValueError:
                log.warning("model card %r is not JSON; left out", name)
        return out

    # --- claim-check --------------------------------------------------------------------------

    async def leave(self, data: bytes) -> str:
        key = f"{CLAIM_CHECK_PREFIX}{uuid4().hex}"
        await self.redis.setex(key, CLAIM_CHECK_TTL_SECONDS, data)  # a blob always expires
        return key

    async def take(self, key: str) -> bytes:
        data = await self.redis.getdel(key)
        if data is None:
            raise NotFound(f"{key} is not on the broker: taken already, expired, or never left")
        return data.encode() if isinstance(data, str) else bytes(data)

    # --- waiting ------------------------------------------------------------------------------

    def _reserved(self) -> _Reservation:
        if self._waiting >= self.max_waiters:
            raise TooMany(f"{self._waiting} requests are waiting at this edge already (at most {self.max_waiters}); "
                          "try again shortly", retry_after=1.0)
        return _Reservation(self)

    async def _meta(self, key: str) -> dict[str, Any] | None:
        raw = await self.redis.get(key)
        return None if raw is None else self._decode(raw)

    def _decode(self, raw: bytes | str) -> dict[str, Any] | None:
        try:
            meta = celery_json(raw)  # the workers' result_serializer (protocol.contract: JSON)
        except (ValueError, TypeError) as exc:  # not Celery's: something else wrote the key; no answer
            log.warning("a result that is not Celery's: %s", exc)
            return None
        return meta if isinstance(meta, dict) else None

    async def _until(self, key: str, messages: asyncio.Queue[bytes], meta: dict[str, Any] | None,
                     wait: float, done: tuple[str, ...]) -> dict[str, Any] | None:
        """``meta`` or what is stored after it, once its status is in ``done`` or ``wait`` has passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while meta is None or meta.get("status") not in done:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                meta = self._decode(await asyncio.wait_for(messages.get(), min(remaining, RECHECK_SECONDS)))
            except TimeoutError:
                meta = await self._meta(key)
        return meta


class _Reservation:
    def __init__(self, broker: EdgeBroker) -> None:
        self.broker = broker

    def __enter__(self) -> None:
        self.broker._waiting += 1

    def __exit__(self, *exc: object) -> None:
        self.broker._waiting -= 1


def _shown(meta: dict[str, Any] | None) -> tuple[str, Any]:
    """(state, the signed reply or None): only what a node signs is relayed as a reply; another
    final state (FAILURE, REVOKED) is unsigned and proves nothing (``Transport.result``)."""
    if meta is None:
        return states.PENDING, None
    state = str(meta.get("status") or states.PENDING)
    return state, meta.get("result") if state in ANSWERS else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _mark(value: bytes | str | None) -> str | None:
    """A cancel key's value as JSON can carry it (it is ASCII when a node or a client wrote it)."""
    return None if value is None else value.decode("utf-8", "replace") if isinstance(value, bytes) else value
