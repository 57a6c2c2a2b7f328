"""kombu's Redis transport with a screen between the pop and the delivery.

Every item a gridq worker pops from its queue goes through ``protocol.inbox.screen``
before kombu parses it: what passes is delivered as the message gridq rebuilt, junk goes to
the queue's dead-letter list (``protocol.contract.dead_letter_key``, the newest
``DEAD_LETTER_MAX``) and the worker goes on. :func:`screened` puts it under a worker's app.

The channel also keeps the worker's in-flight messages under keys of its queue's own
(:func:`own_in_flight`), and restores those a dead worker left without a Lua script: kombu
takes its restore lock with redis-py's ``Lock``, whose release is a script, and no worker's
broker user may run scripts (ops/acl.py). :class:`LuaFreeQoS` releases it with WATCH/MULTI.

On a Sentinel broker (``protocol.broker``) the channel is kombu's Sentinel channel, and what
a worker sends (a job it defers, a registration) counts as sent once a replica holds it
(:meth:`ScreenedChannel._put`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any

from celery import Celery
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps

from protocol.broker import is_sentinel, replicated_write, unconfirmed
from protocol.contract import DEAD_LETTER_MAX, DEAD_LETTER_TTL_SECONDS, dead_letter_key, in_flight_keys
from protocol.inbox import DEFAULT_MAX_DELIVERIES, Admitted, Junk, screen
from workers.broker import RETRY_ON
from workers.locks import release

log = logging.getLogger(__name__)
Empty = kombu_redis.Empty
HEAD_CHARS = 2048  # how much of a dead item the operator sees


class LuaFreeQoS(kombu_redis.QoS):  # type: ignore[misc]
    """kombu's ack emulation, restoring visibility-timed-out messages under a lock that is
    taken with ``SET NX EX`` and released by ``WATCH``/``MULTI``/``DEL`` (only if still ours),
    not by redis-py's Lua release script. One consumer of a queue restores at a time, as in
    kombu; a lock whose holder died expires after ``unacked_mutex_expire``."""

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        self._vrestore_count += 1
        if (self._vrestore_count - 1) % (interval or 1):  # kombu's throttle
            return
        with self.channel.conn_or_acquire() as client:
            token = uuid.uuid4().hex
            if not client.set(self.unacked_mutex_key, token, nx=True, ex=self.unacked_mutex_expire):
                return  # another worker of this queue is restoring
            try:
                ceil = time.time() - self.visibility_timeout
                visible = client.zrange(self.unacked_index_key, ceil, 0, desc=True, byscore=True,
                                        offset=num and start, num=num, withscores=True)
                for tag, _score in visible or []:
                    self.restore_by_tag(tag, client)
            finally:
                release(client, self.unacked_mutex_key, token)


class ScreenedChannel(kombu_redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel; each popped item is screened before it is delivered."""

    QoS = LuaFreeQoS

    from_transport_options = (  # type: ignore[assignment]  # kombu types it as its own fixed tuple
        *kombu_redis.Channel.from_transport_options, "served_tasks", "max_deliveries", "wait_replicas",
        "wait_timeout")
    served_tasks: tuple[str, ...] = ()
    max_deliveries = DEFAULT_MAX_DELIVERIES
    wait_replicas = 0  # on a Sentinel broker: replicas that must hold what is sent (protocol.broker)
    wait_timeout = 30.0

    @property
    def supports_batch_publish(self) -> bool:
        return not self.wait_replicas and bool(super().supports_batch_publish)

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        """kombu's LPUSH of a message; on a replicated broker followed by WAIT on the same
        connection, and made again to the primary the sentinels name now until a replica
        holds it (``protocol.broker.replicated_write``)."""
        if not self.wait_replicas or kwargs.get("_publish_batch") is not None or queue in (self._expires or {}):
            super()._put(queue, message, **kwargs)
            return
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        body = dumps(message)

        def write(wait_ms: int) -> int:
            with self.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
                pipe.lpush(key, body)
                pipe.execute_command("WAIT", self.wait_replicas, wait_ms)
                return int(pipe.execute()[-1])

        done = replicated_write(write, lambda: self.pool.disconnect(inuse_connections=False), self.wait_replicas,
                                self.wait_timeout, retry_on=RETRY_ON)
        if done.replicas < self.wait_replicas:
            if done.error is not None:
                raise done.error
            log.warning("%s", unconfirmed(f"a message sent on {queue}", "the primary", done, self.wait_replicas,
                                          self.wait_timeout))

    def _brpop_read(self, **options: Any) -> bool:
        # kombu 5.x's _brpop_read, but the item is screened instead of json-loaded as it is
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # reconnect on the next iteration, as kombu does
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()
        admitted = self._admit(item, dest)
        if admitted is not None:
            self.connection._deliver(admitted, dest)
        return True

    def _get(self, queue: str, timeout: Any = None) -> dict[str, Any]:
        with self.conn_or_acquire() as client:
            for priority in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, priority))
                if item:
                    admitted = self._admit(item, queue)
                    if admitted is not None:
                        return admitted
            raise Empty()

    def _admit(self, item: bytes | str, queue: str) -> dict[str, Any] | None:
        """The message to deliver, or None when the item went to the dead-letter list."""
        verdict = screen(item, queue, self.served_tasks, uuid.uuid4().hex, self.max_deliveries)
        if isinstance(verdict, Junk):
            head = item[:HEAD_CHARS]
            self._dead_letter(queue, verdict.reason, {"bytes": len(item), "head": head.decode("utf-8", "replace")
                                                      if isinstance(head, bytes) else head})
            return None
        if verdict.given_up:  # delivered once more, so that its task answers the requester a typed failure
            self._dead_letter(queue, given_up_reason(verdict.delivery - 1), _named(verdict))
        return verdict.message

    def _dead_letter(self, queue: str, reason: str, what: dict[str, Any]) -> None:
        log.warning("%s: dead-lettered %s: %s", queue, what.get("id") or "an item", reason)
        entry = json.dumps({"queue": queue, "at": time.time(), "reason": reason, **what})
        key = dead_letter_key(queue)
        try:
            with self.conn_or_acquire() as client, client.pipeline() as pipe:
                pipe.lpush(key, entry).ltrim(key, 0, DEAD_LETTER_MAX - 1)
                pipe.expire(key, DEAD_LETTER_TTL_SECONDS).execute()
        except self.connection_errors:
            log.exception("%s: could not write the dead-letter list; the item is dropped", queue)


def _named(admitted: Admitted) -> dict[str, Any]:
    return {"task": admitted.task, "id": admitted.id}


def given_up_reason(deliveries: int) -> str:
    return (f"delivered {deliveries} times and its worker stopped each time before finishing it (killed, out of "
            "memory, or restarted); it is not run again")


class ScreenedTransport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = ScreenedChannel


class ScreenedSentinelChannel(ScreenedChannel, kombu_redis.SentinelChannel):  # type: ignore[misc]
    """The same, on a Sentinel broker: each new connection asks the sentinels for the primary."""

    from_transport_options = (  # type: ignore[assignment]
        *kombu_redis.SentinelChannel.from_transport_options, "served_tasks", "max_deliveries", "wait_replicas",
        "wait_timeout")


class ScreenedSentinelTransport(kombu_redis.SentinelTransport):  # type: ignore[misc]
    Channel = ScreenedSentinelChannel


def screened(app: Celery, tasks: Iterable[str], max_deliveries: int = DEFAULT_MAX_DELIVERIES) -> None:
    """Make ``app``'s worker screen what it pops: only ``tasks`` are served, a message is
    given up after ``max_deliveries`` deliveries."""
    app.conf.broker_transport = ScreenedSentinelTransport if is_sentinel(app.conf.broker_url) else ScreenedTransport
    app.conf.broker_transport_options = {**app.conf.broker_transport_options,
                                         "served_tasks": tuple(tasks), "max_deliveries": max_deliveries}


def own_in_flight(app: Celery, queue: str) -> None:
    """Keep what ``app``'s worker has taken from ``queue`` but not acknowledged under keys of
    that queue's own (``protocol.contract.in_flight_keys``), not kombu's one ``unacked`` hash
    shared by every queue: its broker user then needs no other queue's in-flight jobs, and
    its restores put back only its own."""
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, **in_flight_keys(queue)}
