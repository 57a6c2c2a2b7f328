"""A party's sessions come on a list of its own, not as Celery tasks.

A query's hot path is one Celery task (the querier's, to the host); the host hands each
party its session by pushing the signed envelope on the party's list
(``protocol.contract.mpc_session_key``) and waits for the answers on its ack lists. A Celery
task a party would cost a publish, the worker's dispatch to a pool process and a result
nobody reads: ~3 ms a hop, measured (ops/bench/RESULTS.md), where a push and a pop cost
~0.2 ms.

Every process of a node's peer pool runs one :class:`SessionLoop` in a thread of its own,
beside the Celery tasks it serves (shares to keep, bundles to deal): ``[mpc] sessions``
processes take sessions in the order hosts pushed them, under the grid's dispatch lock, as
the Celery queue gave them before. An item is verified exactly as a task's envelope is
(signed by a node the gateway lists, for this node, fresh, never seen) and only a session is
taken from the list; its answer goes on the host's ack list either way. An item that is not
an envelope is logged and dropped: there is no verified sender to answer. A session popped by
a process that then dies is lost, not retried: its query fails with ``NodeUnavailable`` from
the parties that waited for it (a query runs once).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from protocol.broker import error_text
from protocol.contract import mpc_session_key
from protocol.inbox import MAX_ITEM_BYTES

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0  # how long one pop waits: a stop is seen within this
PAUSE_SECONDS = 0.5  # after a broker error, before the next pop


class SessionLoop:
    """Pop ``node``'s sessions and hand each to ``serve(envelope, delivery_id)`` until stopped."""

    def __init__(self, client: Any, node: str, serve: Callable[[Any, str], None]) -> None:
        self.client, self.key, self.serve = client, mpc_session_key(node), serve
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SessionLoop:
        self._thread = threading.Thread(target=self.run, name=f"sessions {self.key}", daemon=True)
        self._thread.start()
        return self

    def stop(self, wait: float) -> None:
        """No more pops; a session running now may finish within ``wait`` seconds."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(wait)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                got = self.client.blpop([self.key], timeout=POLL_SECONDS)
            except Exception as exc:  # the broker is down: the worker says so too; pop again later
                log.warning("could not pop sessions from %s: %s", self.key, error_text(exc))
                self._stop.wait(PAUSE_SECONDS)
                continue
            if got is not None:
                self.take(got[1])

    def take(self, item: bytes | str) -> None:
        """Serve one item of the list; whatever it holds, the loop goes on."""
        raw = _envelope(item)
        if raw is None:
            log.warning("dropped an item of %s that is not a signed envelope (%d bytes): %r", self.key, len(item),
                        item[:200])
            return
        try:
            self.serve(raw, str(raw.get("job_id") or "")[:80])
        except Exception:  # a bug, not a refusal (those are answered): log it and serve the next session
            log.exception("session %s failed unanswered", raw.get("job_id"))


def _envelope(item: bytes | str) -> dict[str, Any] | None:
    if len(item) > MAX_ITEM_BYTES:
        return None
    try:
        raw = json.loads(item)
    except ValueError:
        return None
    return raw if isinstance(raw, dict) else None
