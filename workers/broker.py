"""The owner's side of a broker failure: what the node's admin API (``workers.Node``, and
the ``gridq`` owner commands on it) raises when Redis is down — :class:`BrokerUnavailable`
naming the node's broker, never a redis-py or kombu exception, nor the RuntimeError that
Celery's result backend wraps one in once its reconnection retries run out.

The client maps its own failures the same way (``orchestrator.transport.broker_errors``);
the two sides share only ``protocol``, and the messages differ: an owner is told where its
node's config names the broker.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis
from celery import Celery
from kombu.exceptions import KombuError

from protocol.contract import INTERACTIVE_RESULT_RETRY
from protocol.errors import BrokerUnavailable
from protocol.pinning import shown

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
    return BrokerUnavailable(f"node {node!r} cannot reach its broker at {shown(url)}: {type(exc).__name__}: {exc}. "
                             "Is Redis running there? The node's config names it ([node] broker or broker_file); "
                             "`gridq status` checks the grid.")

