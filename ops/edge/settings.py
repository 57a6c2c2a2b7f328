"""The edge's one settings object, loaded once (``gridq edge`` options) and passed in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from protocol.errors import InvalidRequest

MIB = 1024 * 1024
DEFAULT_PORT = 8750
# the browser page a colleague adds later; served at / if the folder exists
DEFAULT_STATIC = Path(__file__).resolve().parents[2] / "clients" / "ts" / "web"


@dataclass(frozen=True)
class EdgeSettings:
    """Where the edge listens, whom it admits, and its limits.

    * bodies: ``job_body_max`` for ``POST /v1/jobs``, ``blob_body_max`` for ``POST /v1/blobs``,
      ``search_body_max`` for ``POST /v1/search`` (bytes; 413 beyond, on Content-Length and while
      reading);
    * rates (token buckets, in this process): ``job_rate``/``job_burst`` per verified sender on
      ``POST /v1/jobs``; ``ip_rate``/``ip_burst`` per client address on every other route (and for
      envelopes that fail verification); ``blob_rate``/``blob_burst`` bytes per client address
      left as blobs;
    * waits: ``max_wait`` seconds at most for ``GET /v1/jobs/{id}?wait=``, at most
      ``max_waiters`` long-polls at once (429 beyond), ``search_timeout`` for the gateway.
    """

    broker: str
    users: Path
    static: Path | None = DEFAULT_STATIC
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    job_body_max: int = 1 * MIB
    blob_body_max: int = 16 * MIB
    search_body_max: int = 64 * 1024
    job_rate: float = 50.0
    job_burst: float = 100.0
    ip_rate: float = 100.0
    ip_burst: float = 200.0
    blob_rate: float = 8.0 * MIB
    blob_burst: float = 32.0 * MIB
    max_wait: float = 30.0
    max_waiters: int = 1000
    search_timeout: float = 30.0
    send_threads: int = 4
    access_log: bool = False

    def __post_init__(self) -> None:
        for name in ("job_body_max", "blob_body_max", "search_body_max", "max_waiters", "send_threads"):
            if getattr(self, name) < 1:
                raise InvalidRequest(f"{name} must be at least 1")
        for name in ("job_rate", "job_burst", "ip_rate", "ip_burst", "blob_rate", "blob_burst", "max_wait",
                     "search_timeout"):
            if not getattr(self, name) > 0:
                raise InvalidRequest(f"{name} must be positive")
