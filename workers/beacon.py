"""Keeping a key posted on the broker from a worker's main process: the gateway's public key
and its signed node listing (no expiry: re-posted in case the broker lost them; the listing
carries its own date), and each worker's liveness (an
expiring key refreshed while the worker runs, ``protocol.contract.alive_key``: a node whose
key has expired is down — search leaves its datasets out and a job for it fails at once).

    posting = keep_posted(url, alive_key("node.hospital"), "1", every=ALIVE_EVERY, ttl=ALIVE_TTL)
    ...
    posting.stop()
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from protocol.broker import error_text, parse_broker
from workers.broker import redis_client

log = logging.getLogger(__name__)


class Posting:
    """A key kept posted by a daemon thread until :meth:`stop`."""

    def __init__(self, url: str, key: str, value: str | Callable[[], str], every: float, ttl: float | None) -> None:
        self.key, self.value, self.every, self.ttl = key, value, every, ttl
        self._stop = threading.Event()
        self._client = redis_client(url)
        # on a Sentinel broker each post asks the sentinels where the primary is: after a failover a
        # demoted primary still up takes writes until the sentinels repoint it (~10 s), and a liveness
        # mark posted there would be lost while the new primary's copy runs out
        self._ask_again = parse_broker(url).sentinel
        self._post()
        threading.Thread(target=self._again, name=f"post {key}", daemon=True).start()

    def _post(self) -> None:
        if self._ask_again:
            self._client.connection_pool.disconnect(inuse_connections=False)
        value = self.value() if callable(self.value) else self.value
        if self.ttl is None:
            self._client.set(self.key, value)
        else:
            self._client.setex(self.key, int(self.ttl), value)

    def _again(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self._post()
            except Exception as exc:  # the broker is down (the worker says so too), or the value's source: again later
                log.warning("could not post %s: %s", self.key, error_text(exc))

    def stop(self) -> None:
        """No more posts; an expiring key is deleted now (a worker that stops cleanly is down at once)."""
        self._stop.set()
        try:
            if self.ttl is not None:
                self._client.delete(self.key)
        except redis.RedisError:
            pass  # it expires anyway
        finally:
            self._client.close()


def keep_posted(url: str, key: str, value: str | Callable[[], str], every: float, ttl: float | None = None
                ) -> Posting:
    """Post ``value`` under ``key`` now and again every ``every`` seconds from a daemon thread
    (with ``ttl``, each post expires after it: a worker that dies stops refreshing). A
    callable ``value`` is called at each post: what is posted stays current."""
    return Posting(url, key, value, every, ttl)
