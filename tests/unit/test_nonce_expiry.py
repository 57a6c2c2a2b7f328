"""A client's nonce store forgets a nonce once its envelope has expired (an expired envelope
is refused before its nonce is looked at), so a client that reads replies for hours holds
the nonces of one envelope lifetime, not one per reply it ever read."""

from __future__ import annotations

import secrets
import tracemalloc

import pytest

from protocol.envelope import MemoryNonceStore, open_envelope, seal_envelope
from protocol.errors import MessageExpired, ReplayedNonce
from protocol.identity import Identity

NODE = Identity.generate("ward")
T0 = 1_700_000_000.0
TTL = 60.0  # the reply lifetime of these tests' envelopes


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def test_a_nonce_is_kept_while_its_envelope_lives_and_forgotten_after() -> None:
    clock = Clock()
    nonces = MemoryNonceStore(clock)
    reply = seal_envelope(NODE, recipient="alice", kind="reply", job_id="ward:1", body={}, now=T0, ttl=TTL)
    raw = reply.model_dump(mode="json")

    def read(delivery_id: str) -> None:
        open_envelope(raw, recipient="alice", keyring={"ward": NODE.public}, nonces=nonces, delivery_id=delivery_id,
                      now=clock.now)

    read("ward:1")
    clock.now = T0 + TTL - 1  # still valid: a replay under another delivery is refused
    with pytest.raises(ReplayedNonce):
        read("ward:2")
    assert len(nonces) == 1
    clock.now = T0 + TTL + 1
    nonces.remember("ward", secrets.token_hex(16), "other", clock.now + TTL)  # any later use sweeps
    assert len(nonces) == 1  # only the new one: the expired reply's nonce is gone …
    with pytest.raises(MessageExpired):  # … and its envelope is refused anyway
        read("ward:2")


def test_memory_stays_bounded_by_one_envelope_lifetime() -> None:
    """100,000 replies at 100 a second, each valid for 60 s: the store holds ~6,000 nonces at
    any time, and its memory after 100,000 is what it was after 10,000."""
    clock = Clock()
    nonces = MemoryNonceStore(clock)

    def receive(n: int) -> None:
        for _ in range(n):
            clock.now += 0.01
            assert nonces.remember("ward", secrets.token_hex(16), secrets.token_hex(20), clock.now + TTL)

    tracemalloc.start()
    try:
        receive(10_000)
        after_10k = tracemalloc.get_traced_memory()[0]
        receive(90_000)
        after_100k = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(nonces) <= TTL / 0.01 + 1
    assert after_100k < 1.3 * after_10k  # kept forever, it would be 10×


def test_a_reply_with_a_later_expiry_outlives_earlier_ones() -> None:
    """Envelopes of different lifetimes (a parked job's answer lives longer): each nonce
    goes at its own envelope's expiry, whatever order they came in."""
    clock = Clock()
    nonces = MemoryNonceStore(clock)
    assert nonces.remember("ward", "long-lived-nonce", "d-1", T0 + 3600)
    assert nonces.remember("ward", "short-lived-nonce", "d-2", T0 + 10)
    clock.now = T0 + 20
    assert nonces.remember("ward", "another-nonce-00", "d-3", T0 + 30)
    assert not nonces.remember("ward", "long-lived-nonce", "d-9", T0 + 3600)  # still remembered: a replay
    assert nonces.remember("ward", "short-lived-nonce", "d-9", T0 + 10)  # forgotten (open_envelope refuses it first)
