"""The owner's side of a broker failure: what the node's admin API (``workers.Node``, and
the ``gridq`` owner commands on it) raises when Redis is down — :class:`BrokerUnavailable`
naming the node's broker, never a redis-py or kombu exception, nor the RuntimeError that
Celery's result backend wraps one in once its reconnection retries run out.

The client maps its own failures the same way (``orchestrator.transport.broker_errors``);
the two sides share only ``protocol``, and the messages differ: an owner is told where its
node's config names the broker.

It also builds the workers' connections from any broker URL of ``protocol.broker`` —
:func:`redis_client`, and the result backend that, on a Sentinel URL, counts a result as
stored once a replica holds it (:class:`ReplicatedSentinelBackend`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from celery import Celery
from celery.backends.redis import SentinelBackend
from kombu.exceptions import KombuError
from redis.sentinel import Sentinel

from protocol.broker import (
    error_text,
    failure_hint,
    is_sentinel,
    parse_broker,
    replicated_write,
    sentinel_arguments,
    unconfirmed,
)
from protocol.contract import INTERACTIVE_RESULT_RETRY
from protocol.errors import BrokerUnavailable
from protocol.pinning import shown

log = logging.getLogger(__name__)
# what a write made again after a failover may meet: a dropped connection, a demoted primary (READONLY)
RETRY_ON: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)

DRIVER_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, KombuError)


@contextmanager
def broker_errors(node: str, url: str) -> Iterator[None]:
    """Broker failures inside become :class:`BrokerUnavailable` for ``node``'s owner."""
    try:
        yield
    except DRIVER_ERRORS as exc:
        raise _unavailable(node, url, exc) from None
    except RuntimeError as exc:
        if not isinstance(exc.__cause__, DRIVER_ERRORS):
            raise
        raise _unavailable(node, url, exc.__cause__) from None


def interactive(app: Celery) -> Celery:
    """``app`` for an owner who waits on it: its result backend gives up on a dead broker in
    seconds (``INTERACTIVE_RESULT_RETRY``), not Celery's ~19 s. Not for the worker's app."""
    app.conf.result_backend_transport_options = {**app.conf.result_backend_transport_options,
                                                 "retry_policy": INTERACTIVE_RESULT_RETRY}
    return app


def _unavailable(node: str, url: str, exc: BaseException) -> BrokerUnavailable:
    hint = failure_hint(url, exc) or "Is Redis running there?"
    return BrokerUnavailable(f"node {node!r} cannot reach its broker at {shown(url)}: {type(exc).__name__}: "
                             f"{error_text(exc)}. "
                             f"{hint} The node's config names it ([node] broker or broker_file); "
                             "`gridq status` checks the grid.")


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


class ReplicatedSentinelBackend(SentinelBackend):  # type: ignore[misc]
    """Celery's Sentinel result backend, but a result counts as stored only once
    ``wait_replicas`` replicas hold it (``protocol.broker``: the write, then WAIT, on one
    connection; written again to the primary the sentinels name now, until confirmed or
    ``wait_timeout``). A worker acknowledges a job after its result is stored: so a failover
    loses neither (a job delivered again is answered with its recorded reply)."""

    def _set(self, key: str, value: Any, expires: Any = None) -> None:
        options = self._transport_options
        replicas = int(options.get("wait_replicas", 0))
        if not replicas:
            super()._set(key, value, expires)
            return
        expires = self.expires if expires is None else expires

        def write(wait_ms: int) -> int:
            with self.client.pipeline(transaction=False) as pipe:  # WAIT would not wait inside MULTI
                if expires:
                    pipe.setex(key, expires, value)
                else:
                    pipe.set(key, value)
                pipe.publish(key, value)
                pipe.execute_command("WAIT", replicas, wait_ms)
                return int(pipe.execute()[-1])

        timeout = float(options.get("wait_timeout", 30.0))
        done = replicated_write(write, lambda: self.client.connection_pool.disconnect(inuse_connections=False),
                                replicas, timeout, retry_on=RETRY_ON)
        if done.replicas < replicas:
            if done.error is not None:
                raise done.error  # Celery's retry policy takes it from here
            log.warning("%s", unconfirmed(f"the result {key}", "the primary", done, replicas, timeout))


def replicated_setex(client: redis.Redis, key: str, ttl: int, data: bytes, replicas: int, timeout: float) -> None:
    """``SETEX key ttl data``; with ``replicas``, followed by WAIT on the same connection and
    made again to the primary the sentinels name now until that many replicas hold it
    (``protocol.broker.replicated_write``); not confirmed in time: logged (it is on the primary)."""
    if not replicas:
        client.setex(key, ttl, data)
        return

    def write(wait_ms: int) -> int:
        with client.pipeline(transaction=False) as pipe:
            pipe.setex(key, ttl, data)
            pipe.execute_command("WAIT", replicas, wait_ms)
            return int(pipe.execute()[-1])

    done = replicated_write(write, lambda: client.connection_pool.disconnect(inuse_connections=False), replicas,
                            timeout, retry_on=RETRY_ON)
    if done.replicas < replicas:
        if done.error is not None:
            raise done.error
        log.warning("%s", unconfirmed(f"the value {key}", "the primary", done, replicas, timeout))


def replicated_results(app: Celery) -> Celery:
    """``app``'s result backend, on a Sentinel broker, :class:`ReplicatedSentinelBackend`
    (before anything reads ``app.backend``: Celery keeps the one it built)."""
    backend = str(app.conf.result_backend or "")
    if is_sentinel(backend):
        app.conf.result_backend = f"{__name__}:ReplicatedSentinelBackend+{backend}"
    return app

