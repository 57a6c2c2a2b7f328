"""The client's (and the gateway's) Celery app, built from the wire contract."""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.transport import redis as kombu_redis

from protocol.contract import celery_settings


class _ClientQoS(kombu_redis.QoS):  # type: ignore[misc]
    """A client consumes only replies to its own control requests (a ping, an inspect), which
    kombu takes without acknowledgement: nothing of its own is ever in flight, so it does not
    look for messages to restore. kombu's restore would take a lock released by a Lua script,
    and read in-flight keys, neither of which a client's broker user may (ops/acl.py)."""

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        return None


class _ClientChannel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = _ClientQoS


class ClientTransport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = _ClientChannel


def make_celery(broker: str, name: str = "gridq-client") -> Celery:
    app = Celery(name, broker=broker, backend=broker, set_as_current=False)
    app.conf.update(celery_settings())
    app.conf.broker_transport = ClientTransport  # a worker's app replaces it (workers.inbox.screened)
    return app
