"""A small Python client of the edge's HTTP API (standard library only, one keep-alive
connection): what the benchmark and the tests speak, and a model for clients in other
languages. The envelope is built and signed here, with the sender's key, exactly as
``orchestrator.transport.Transport`` builds it; the edge never sees the key.

    edge = EdgeClient("http://127.0.0.1:8750")
    job_id = edge.submit(signed_job(alice, "hospital", RunJob(plan=..., release=RawRelease())))
    state, reply = edge.reply(job_id, wait=30)     # the node's signed reply: verify it yourself
"""

from __future__ import annotations

import http.client
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlsplit

from protocol.contract import Tasks
from protocol.envelope import seal_envelope
from protocol.errors import GridError, error_from_wire
from protocol.identity import Identity


def signed_job(identity: Identity, node: str, body: Any, *, task: str = Tasks.RUN_JOB, job_id: str | None = None,
               ttl: float | None = None) -> dict[str, Any]:
    """A ``POST /v1/jobs`` body: ``body`` (a message of ``protocol.messages``) signed by
    ``identity`` for ``node``, as ``Transport._envelope`` signs it."""
    options = {} if ttl is None else {"ttl": ttl}
    envelope = seal_envelope(identity, recipient=node, kind=body.kind, job_id=job_id or f"{node}:{uuid.uuid4().hex}",
                             body=body.model_dump(mode="json"), now=time.time(), **options)
    return {"task": task, "envelope": envelope.model_dump(mode="json")}


class EdgeError(Exception):
    """A refusal: the HTTP status and the protocol's typed error."""

    def __init__(self, status: int, error: GridError) -> None:
        super().__init__(f"{status} {error.code}: {error.message}")
        self.status, self.error = status, error


class EdgeClient:
    def __init__(self, url: str, timeout: float = 60.0) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.timeout = parts.hostname or "127.0.0.1", parts.port or 80, timeout
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def raw(self, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one request; the connection is opened again after an error."""
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            self._conn.request(method, path, body=body, headers=headers or {})
            answer = self._conn.getresponse()
            data = answer.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if answer.getheader("connection", "").lower() == "close":
            self.close()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, data

    def call(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        """(status, parsed JSON) of a request with a JSON body (``payload``, if not None)."""
        body = None if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        status, _, data = self.raw(method, path, body, {"Content-Type": "application/json"} if body else None)
        return status, json.loads(data) if data else None

    def _ok(self, method: str, path: str, payload: Any = None) -> Any:
        status, answer = self.call(method, path, payload)
        if status >= 400:
            raise EdgeError(status, error_from_wire(answer["error"]))
        return answer

    def submit(self, request: dict[str, Any]) -> str:
        """Send a signed job (:func:`signed_job`); its job id."""
        return str(self._ok("POST", "/v1/jobs", request)["job_id"])

    def reply(self, job_id: str, wait: float = 0.0) -> tuple[str, Any]:
        """The job's state and the signed reply (None while there is none), waiting up to ``wait`` s."""
        answer = self._ok("GET", f"/v1/jobs/{quote(job_id, safe=':')}?wait={wait:g}")
        return answer["state"], answer["reply"]

    def search(self, tags: Sequence[str] = (), words: Sequence[str] = ()) -> tuple[str, Any]:
        """The gateway's signed answer (a ``GatewayReply`` envelope) and the id it was asked under."""
        answer = self._ok("POST", "/v1/search", {"tags": list(tags), "words": list(words)})
        return answer["job_id"], answer["reply"]

    def models(self) -> dict[str, Any]:
        return dict(self._ok("GET", "/v1/models")["models"])

    def gateway(self) -> dict[str, str]:
        return dict(self._ok("GET", "/v1/gateway"))
