"""The edge's HTTP API (Starlette, served by uvicorn: ``ops.edge.run``). JSON in and out;
every refusal is ``{"error": {"code", "message"}}`` with the protocol's error code and an
HTTP status (``ops.edge.checks.http_status``).

    GET  /healthz                       {"ok": true}
    GET  /v1/gateway                    {"public_key", "listing"}: the gateway's key and signed node listing
    POST /v1/search?job_id=ID  SearchQuery  {"job_id", "reply"}: the gateway's signed reply to job ID (the
                                        client's fresh id, which the reply is signed for; else the edge picks one)
    POST /v1/jobs       {"task", "envelope"}   202 {"job_id", "queue"}
    GET  /v1/jobs/{id}?wait=SECONDS     {"state", "reply"}: SUCCESS / PENDING_APPROVAL with the signed reply,
                                        else PENDING / STARTED (…) and null
    POST /v1/blobs      raw bytes       {"key"}: left by claim-check, for an hour
    GET  /v1/blobs/{key}                the bytes, taken once
    GET  /v1/models                     {"models": {"owner/name": card}}
    GET  /…                             static files (--static), if the folder exists
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from kombu.exceptions import KombuError
from redis import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ops.edge.broker import EdgeBroker
from ops.edge.checks import (
    Keyring,
    RateLimiter,
    TooLarge,
    TooMany,
    check_blob_key,
    check_job_id,
    check_length,
    check_task,
    error_body,
    http_status,
    parse_job_request,
    parse_search,
    queue_for,
    verify,
    wait_seconds,
)
from ops.edge.settings import EdgeSettings
from protocol.errors import BrokerUnavailable, GridError, InvalidRequest, NotFound
from protocol.pinning import shown

log = logging.getLogger(__name__)


class Edge:
    """The routes, over one broker connection, one keyring and the rate limits."""

    def __init__(self, settings: EdgeSettings, keyring: Keyring, broker: EdgeBroker) -> None:
        self.settings, self.keyring, self.broker = settings, keyring, broker
        self.jobs = RateLimiter(settings.job_rate, settings.job_burst, "sender")
        self.ips = RateLimiter(settings.ip_rate, settings.ip_burst, "client")
        self.blobs = RateLimiter(settings.blob_rate, max(settings.blob_burst, settings.blob_body_max), "blob bytes of")

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.broker.start()
        log.info("edge on %s: %d users admitted from %s", shown(self.broker.url), len(self.keyring),
                 self.keyring.folder)
        try:
            yield
        finally:
            await self.broker.close()

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def gateway(self, request: Request) -> Response:
        self.ips.check(_ip(request))
        return JSONResponse(await self.broker.gateway())

    async def search(self, request: Request) -> Response:
        self.ips.check(_ip(request))
        asked = request.query_params.get("job_id")  # the client's: the gateway signs its reply for this id
        job_id = None if asked is None else check_job_id(asked)
        query = parse_search(await read_body(request, self.settings.search_body_max))
        job_id, reply = await self.broker.search(query.model_dump(mode="json"), self.settings.search_timeout, job_id)
        return JSONResponse({"job_id": job_id, "reply": reply})

    async def submit(self, request: Request) -> Response:
        """Verify a signed envelope and enqueue it, as the Python client would have."""
        now = time.time()
        try:  # what fails before its sender is known counts against the client's address
            task, raw = parse_job_request(await read_body(request, self.settings.job_body_max))
            check_task(task)
            env = verify(raw, self.keyring, now)
            check_job_id(env.job_id)
        except GridError:
            self.ips.check(_ip(request))
            raise
        self.jobs.check(env.sender)
        queue = queue_for(task, env.recipient)
        await self.broker.admit(env, queue, now)
        await self.broker.send(task, queue, env.model_dump(mode="json"), env.job_id)  # as verified
        return JSONResponse({"job_id": env.job_id, "queue": queue}, status_code=202)

    async def job(self, request: Request) -> Response:
        self.ips.check(_ip(request))
        job_id = check_job_id(request.path_params["job_id"])
        state, reply = await self.broker.job(job_id, wait_seconds(request.query_params.get("wait"),
                                                                  self.settings.max_wait))
        return JSONResponse({"state": state, "reply": reply})

    async def leave_blob(self, request: Request) -> Response:
        ip = _ip(request)
        self.ips.check(ip)
        data = await read_body(request, self.settings.blob_body_max)
        self.blobs.check(ip, max(1, len(data)))
        return JSONResponse({"key": await self.broker.leave(data)})

    async def take_blob(self, request: Request) -> Response:
        self.ips.check(_ip(request))
        data = await self.broker.take(check_blob_key(request.path_params["key"]))
        return Response(data, media_type="application/octet-stream")

    async def models(self, request: Request) -> Response:
        self.ips.check(_ip(request))
        return JSONResponse({"models": await self.broker.models()})


def make_app(settings: EdgeSettings, *, keyring: Keyring | None = None, broker: EdgeBroker | None = None
             ) -> Starlette:
    """The edge as an ASGI app (``uvicorn.run(make_app(settings))``)."""
    edge = Edge(settings, keyring or Keyring(settings.users),
                broker or EdgeBroker(settings.broker, max_waiters=settings.max_waiters,
                                     send_threads=settings.send_threads))
    routes: list[BaseRoute] = [
        Route("/healthz", edge.healthz, methods=["GET"]),
        Route("/v1/gateway", edge.gateway, methods=["GET"]),
        Route("/v1/search", edge.search, methods=["POST"]),
        Route("/v1/jobs", edge.submit, methods=["POST"]),
        Route("/v1/jobs/{job_id}", edge.job, methods=["GET"]),
        Route("/v1/blobs", edge.leave_blob, methods=["POST"]),
        Route("/v1/blobs/{key}", edge.take_blob, methods=["GET"]),
        Route("/v1/models", edge.models, methods=["GET"]),
    ]
    if settings.static is not None and settings.static.is_dir():
        routes.append(Mount("/", app=StaticFiles(directory=settings.static, html=True), name="static"))
    handlers = {GridError: refused, HTTPException: http_error, RedisError: broker_failed, KombuError: broker_failed}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=edge.lifespan)


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused past ``limit`` bytes: on its Content-Length, before reading,
    and while reading (a body sent in chunks declares none)."""
    check_length(request.headers.get("content-length"), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the body is over {limit} bytes, the most this route takes")
        chunks.append(chunk)
    return b"".join(chunks)


async def refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GridError)
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if isinstance(exc, TooMany) else None
    log.debug("%s %s refused: %s", request.method, request.url.path, exc)
    return JSONResponse(error_body(exc), status_code=http_status(exc), headers=headers)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, a method it does not take) in the edge's form."""
    assert isinstance(exc, HTTPException)
    error: GridError = NotFound(f"no {request.url.path}") if exc.status_code == 404 else InvalidRequest(exc.detail)
    return JSONResponse(error_body(error), status_code=exc.status_code, headers=exc.headers)


async def broker_failed(request: Request, exc: Exception) -> Response:
    log.warning("broker: %s: %s", type(exc).__name__, exc)
    error = BrokerUnavailable(f"the edge could not reach the grid's broker ({type(exc).__name__}); try again shortly")
    return JSONResponse(error_body(error), status_code=503)


def _ip(request: Request) -> str:
    return request.client.host if request.client else "?"
