"""Where the client meets Redis: the exceptions of redis-py, kombu and Celery's Redis
backend become one typed :class:`BrokerUnavailable` that names the broker and the fix, so
no raw driver exception reaches a data scientist."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import redis
from kombu.exceptions import KombuError, OperationalError

from protocol.errors import BrokerUnavailable

DRIVER_ERRORS = (redis.RedisError, KombuError, OperationalError)


def shown(url: str) -> str:
    """The URL without its password (broker URLs carry ACL credentials)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


@contextmanager
def broker_errors(url: str) -> Iterator[None]:
    try:
        yield
    except DRIVER_ERRORS as exc:
        raise BrokerUnavailable(f"the broker at {shown(url)} failed: {type(exc).__name__}: {exc}. Is Redis "
                                "running there? `gridq up` starts a grid and prints its URL; `gridq status` "
                                "checks one.") from None
