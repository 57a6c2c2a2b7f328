"""The MPC hot path's list consumer (workers.mpc.lists) without a broker: what it hands on, what it
drops, and that nothing an item holds stops it."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from protocol.contract import mpc_session_key
from protocol.inbox import MAX_ITEM_BYTES
from workers.mpc.lists import ListConsumer


class Lists:
    """A list per key, popped as BLPOP would (None when empty), and a broker error on demand."""

    def __init__(self, items: list[Any]) -> None:
        self.items = list(items)
        self.popped = threading.Event()

    def blpop(self, keys: list[str], timeout: float) -> tuple[bytes, Any] | None:
        if not self.items:
            self.popped.set()
            return None
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return keys[0].encode(), item


def test_envelopes_are_served_with_their_job_id_and_the_rest_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    served: list[tuple[Any, str]] = []
    envelope = {"kind": "mpc_session", "sender": "company", "job_id": "j1:hospital"}
    items = [b"not json", b"[1]", b"x" * (MAX_ITEM_BYTES + 1), json.dumps(envelope).encode(), "{}"]
    loop = ListConsumer(Lists(items), mpc_session_key("hospital"), lambda raw, job_id: served.append((raw, job_id)))
    for item in items:
        loop.take(item)
    assert served == [(envelope, "j1:hospital"), ({}, "")]
    assert caplog.text.count(f"dropped an item of {mpc_session_key('hospital')}") == 3


def test_the_loop_survives_a_failing_session_and_a_broker_error() -> None:
    calls: list[str] = []

    def serve(raw: Any, job_id: str) -> None:
        calls.append(job_id)
        if job_id == "bad":
            raise RuntimeError("a bug in a route")

    client = Lists([json.dumps({"job_id": "bad"}), ConnectionError("broker down"), json.dumps({"job_id": "good"})])
    loop = ListConsumer(client, mpc_session_key("hospital"), serve)
    loop.start()
    try:
        assert client.popped.wait(10), "the loop stopped before the list was empty"
    finally:
        loop.stop(wait=5)
    assert calls == ["bad", "good"]
