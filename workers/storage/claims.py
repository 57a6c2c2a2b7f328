"""Claim-check at the worker side: sealed bytes left in Redis under a random key with a
TTL, and taken (fetched and deleted) by the one who was told the key. A key that comes in
a message is taken only if it has the claim-check form: a message cannot make a worker
read or delete any other key of the broker (the gateway's identity, MPC pools, queues)."""

from __future__ import annotations

import re
import secrets

import redis

from protocol.contract import CLAIM_CHECK_PREFIX, CLAIM_CHECK_TTL_SECONDS
from protocol.errors import InvalidRequest, NotFound
from workers.broker import replicated_setex

CLAIM_KEY = re.compile(re.escape(CLAIM_CHECK_PREFIX) + r"[A-Za-z0-9_\-]{16,64}")


def leave(client: redis.Redis, data: bytes, replicas: int = 0, timeout: float = 30.0) -> str:
    """Keep ``data`` under a fresh claim-check key; return the key. On a replicated broker
    (``replicas``, ``timeout``: the URL's ``wait_replicas``/``wait_timeout``), once a replica
    holds it, as the reply that names it (``workers.broker.replicated_setex``)."""
    key = CLAIM_CHECK_PREFIX + secrets.token_urlsafe(24)
    # SETEX: the only way a broker user may leave a blob
    replicated_setex(client, key, CLAIM_CHECK_TTL_SECONDS, data, replicas, timeout)
    return key


def take(client: redis.Redis, key: str) -> bytes:
    """The bytes left under ``key`` (a claim-check key from a message), deleting them."""
    if not CLAIM_KEY.fullmatch(key):
        raise InvalidRequest(f"{key[:80]!r} is not a claim-check key")
    return take_internal(client, key)


def take_internal(client: redis.Redis, key: str) -> bytes:
    """Take bytes under a key this side built itself (a dealer bundle's part, say)."""
    data = client.getdel(key)
    if data is None:
        raise NotFound(f"the sealed value {key!r} has expired from the broker; send the request again")
    return data.encode() if isinstance(data, str) else data
