"""A broker lock without scripts (no non-admin broker user may run Lua, ``ops/acl.py``):
taken with ``SET NX PX``, released by ``WATCH``/``MULTI``/``DEL`` only if still ours; a lock
whose holder died expires on its own."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from kombu.utils.encoding import bytes_to_str

POLL_SECONDS = 0.005


@contextmanager
def held(client: redis.Redis, key: str, ttl: float, wait: float) -> Iterator[bool]:
    """Hold ``key`` for at most ``ttl`` seconds, waiting up to ``wait`` for it. Yields whether
    it was taken: after ``wait`` in vain (a holder that keeps it), the caller goes on without."""
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait
    taken = bool(client.set(key, token, nx=True, px=int(ttl * 1000)))
    while not taken and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        taken = bool(client.set(key, token, nx=True, px=int(ttl * 1000)))
    try:
        yield taken
    finally:
        if taken:
            release(client, key, token)


def release(client: redis.Redis, key: str, token: str) -> None:
    """Delete the lock ``key`` if it still holds ``token`` (not one another worker took since)."""
    with client.pipeline() as pipe:
        try:
            pipe.watch(key)
            if bytes_to_str(pipe.get(key) or b"") == token:
                pipe.multi()
                pipe.delete(key)
                pipe.execute()
            else:
                pipe.unwatch()
        except redis.WatchError:
            pass  # it changed hands in between: not ours to delete
