"""The MPC hot path's messages come on Redis lists, not as Celery tasks.

A query is one push and one pop at each step: the querier pushes its signed query on the
host's list (``protocol.contract.mpc_query_key``), the host pushes each party its signed
session on the party's list (``mpc_session_key``). A Celery task a step cost a publish with
its events, the worker's screen and dispatch to a pool process, and a STARTED state: ~3 ms
a hop on this machine, where a push and a pop cost ~0.2 ms (ops/bench/RESULTS.md). The
host's answer is stored where a task's would be (the result backend), so the querier waits
for it as for any job; a party's goes on its host's ack list, as before.

Every process of a node's MPC pools runs a :class:`ListConsumer` in a thread of its own,
beside the Celery tasks it serves (serving models, keeping shares, dealing): its users' pool
pops queries, its peers' pool sessions (``[mpc] sessions`` processes take them in the order
hosts pushed them under the grid's dispatch lock, as the Celery queue gave them before). An
item is verified exactly as a task's envelope is (signed by whom the pool serves, for this
node, fresh, never seen), and only its list's one kind is taken there. An item that is not
an envelope is logged and dropped: there is no verified sender to answer. A message popped
by a process that then dies is lost, not retried: a query runs once; its querier, or the
parties that waited, get ``NodeUnavailable``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from protocol.broker import error_text
from protocol.inbox import MAX_ITEM_BYTES

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0  # how long one pop waits: a stop is seen within this
PAUSE_SECONDS = 0.5  # after a broker error, before the next pop


class ListConsumer:
    """Pop the list ``key`` and hand each envelope to ``answer(envelope, delivery_id)`` until stopped."""

    def __init__(self, client: Any, key: str, answer: Callable[[Any, str], None]) -> None:
        self.client, self.key, self.answer = client, key, answer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ListConsumer:
        self._thread = threading.Thread(target=self.run, name=f"pop {self.key}", daemon=True)
        self._thread.start()
        return self

    def stop(self, wait: float) -> None:
        """No more pops; what runs now may finish within ``wait`` seconds."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(wait)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                got = self.client.blpop([self.key], timeout=POLL_SECONDS)
            except Exception as exc:  # the broker is down: the worker says so too; pop again later
                log.warning("could not pop from %s: %s", self.key, error_text(exc))
                self._stop.wait(PAUSE_SECONDS)
                continue
            if got is not None:
                self.take(got[1])

    def take(self, item: bytes | str) -> None:
        """Answer one item of the list; whatever it holds, the loop goes on."""
        raw = _envelope(item)
        if raw is None:
            log.warning("dropped an item of %s that is not a signed envelope (%d bytes): %r", self.key, len(item),
                        item[:200])
            return
        try:
            self.answer(raw, str(raw.get("job_id") or "")[:80])
        except Exception:  # a bug, not a refusal (those are answered): log it, serve the next
            log.exception("%s from %s failed unanswered", raw.get("job_id"), self.key)


def _envelope(item: bytes | str) -> dict[str, Any] | None:
    if len(item) > MAX_ITEM_BYTES:
        return None
    try:
        raw = json.loads(item)
    except ValueError:
        return None
    return raw if isinstance(raw, dict) else None
