"""The client's (and the gateway's) Celery app, built from the wire contract."""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from protocol.broker import connection_settings, is_sentinel, replicated_write, unconfirmed
from protocol.contract import celery_settings

# what a write made again after a failover may meet: a dropped connection, a demoted primary (READONLY)
RETRY_ON: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)


class _ClientQoS(kombu_redis.QoS):  # type: ignore[misc]
    """A client consumes only replies to its own control requests (a ping, an inspect), which
    kombu takes without acknowledgement: nothing of its own is ever in flight, so it does not
    look for messages to restore. kombu's restore would take a lock released by a Lua script,
    and read in-flight keys, neither of which a client's broker user may (ops/acl.py)."""

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        return None


class _ClientChannel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = _ClientQoS

    from_transport_options = (  # type: ignore[assignment]  # kombu types it as its own fixed tuple
        *kombu_redis.Channel.from_transport_options, "wait_replicas", "wait_timeout")
    wait_replicas = 0  # on a Sentinel broker: replicas that must hold a job before it counts as sent
    wait_timeout = 30.0

    @property
    def supports_batch_publish(self) -> bool:
        return not self.wait_replicas and bool(super().supports_batch_publish)

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        """kombu's LPUSH of a job; on a replicated broker followed by WAIT on the same
        connection, and made again to the primary the sentinels name now until a replica holds
        it (``protocol.broker.replicated_write``): a send that returns survives a failover. Not
        confirmed in time: OperationalError (the client's BrokerUnavailable) naming the job."""
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
            job = (message.get("headers") or {}).get("id") if isinstance(message, dict) else None
            raise OperationalError(unconfirmed(f"job {job or '(no id)'} on {queue}", "the primary", done,
                                               self.wait_replicas, self.wait_timeout)
                                   + " The job may still run: its ticket id is the job id above.")


class _ClientSentinelChannel(_ClientChannel, kombu_redis.SentinelChannel):  # type: ignore[misc]
    """The same on a Sentinel broker: each new connection asks the sentinels for the primary."""

    from_transport_options = (  # type: ignore[assignment]
        *kombu_redis.SentinelChannel.from_transport_options, "wait_replicas", "wait_timeout")


class ClientTransport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = _ClientChannel


class ClientSentinelTransport(kombu_redis.SentinelTransport):  # type: ignore[misc]
    Channel = _ClientSentinelChannel


def make_celery(broker: str, name: str = "gridq-client") -> Celery:
    """A Celery app on the broker at ``broker``, any URL ``protocol.broker`` reads (TLS, Sentinel)."""
    app = Celery(name, set_as_current=False)
    app.conf.update(connection_settings(broker, celery_settings()))
    # a worker's app replaces it (workers.inbox.screened)
    app.conf.broker_transport = ClientSentinelTransport if is_sentinel(app.conf.broker_url) else ClientTransport
    return app
